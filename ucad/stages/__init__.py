"""The stages of the cached pipeline, one module each (docs/method.md, "The cached pipeline").

Stages of one class:   structure -> prompts -> knowledge -> calibrate      keys
Evaluation of test set j by model version v:
    features(j) -> routing(j, t) for every class t -> scores(j, t) -> evaluate(j, v)

Each module declares its `Stage` (what its artifacts depend on) and one `run_*` function:
a Runtime and small references (a TaskSource, digests, a ModelVersion) in, a StageRecord out.
"""
