"""tuning.stages / tuning.plans: the staged study ranks as the whole post-processing would, and resumes."""
import optuna
import pytest

from competition.cli import UserError
from tuning.folds import fold_problem, make_folds
from tuning.objective import WhiteningCache, rank
from tuning.plans import study_plan
from tuning.problems import study_problems
from tuning.search import SearchConfig, run_search
from tuning.space import SearchSpace, sized_space
from tuning.stages import ExpandedSets, StagePlan, stage_budgets

optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_a_prepared_descriptor_set_ranks_as_the_whole_post_processing(tuning_heldout):
    h = tuning_heldout
    space = sized_space(SearchSpace(), 13, 10)
    sets = [{"weight_a": 1.0, "weight_b": 1.0, "whiten": False, "dba_n": 0, "aqe_n": 0},
            {"weight_a": 0.9, "weight_b": 0.3, "whiten": True, "whiten_dim": 24, "whiten_power": 0.5,
             "dba_n": 3, "dba_alpha": 2.0, "aqe_n": 2, "aqe_alpha": 1.5}]
    plan = StagePlan(sets, h.member_names, space)
    data = fold_problem(h, make_folds(h), distractors=40).data
    cache = WhiteningCache(h.train)
    prepared = ExpandedSets(data, plan, cache, k=1000)
    rerankers = [{}, {"kreciprocal": True, "k1": 9, "k2": 3, "lambda_value": 0.4},
                 {"kreciprocal": False, "diffusion": True, "diffusion_k": 12, "diffusion_alpha": 0.9,
                  "diffusion_gamma": 2.0}]
    for i in range(len(sets)):
        for params in rerankers:
            post = plan.decode({"descriptors": str(i), **params})
            direct = rank(data, post, 1000, cache.get(post))
            staged = prepared.rank(i, post.rerank)
            agree = (direct == staged).mean()
            assert agree > 0.999, (i, params, agree)   # equal but for float near-ties
    assert prepared.built == len(sets)               # one expansion and one graph per set


def test_a_staged_study_completes_its_budget_and_chooses_a_whole_post_processing(tuning_heldout, tmp_path):
    config = SearchConfig(n_trials=12, seed=1, plan="staged", final_top=4)
    url = f"sqlite:///{tmp_path}/s.db"
    r = run_search(tuning_heldout, config, storage=url, study_name="s")
    first = optuna.load_study(study_name="s:descriptors", storage=url)
    n_first, n_second = stage_budgets(12, config.descriptor_share)
    assert r.plan == "staged" and r.n_complete == 12 == n_first + n_second
    assert len([t for t in first.trials if t.value is not None]) == n_first
    assert not any(k in t.params for t in first.trials for k in ("kreciprocal", "diffusion"))
    assert r.study.study_name == "s:reranking" and all("descriptors" in t.params for t in r.study.trials)
    sets = r.study.user_attrs["descriptor_sets"]
    assert '"whiten": false' in sets.split("}")[0] and r.best_post.weights is not None
    chosen = next(c for c in r.final["candidates"] if c["chosen"])
    assert chosen["trial"] == r.best_trial and r.stages[0]["trials"] == n_first
    again = run_search(tuning_heldout, config, storage=url, study_name="s")   # resumed: nothing runs
    assert again.trials_run == 0 and again.best_post == r.best_post


def test_auto_runs_staged_only_on_a_large_study_problem(tuning_heldout):
    small = study_problems(tuning_heldout, SearchConfig())
    assert study_plan(SearchConfig(), small) == "joint" and study_plan(SearchConfig(plan="staged"), small) == "staged"
    assert stage_budgets(200, 0.5) == (100, 100) and stage_budgets(2, 0.5) == (1, 1)
    with pytest.raises(UserError, match="plan must be one of auto, joint, staged, got 'sideways'"):
        study_plan(SearchConfig(plan="sideways"), small)
