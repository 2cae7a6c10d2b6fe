"""The stages of the cached pipeline, one module each (docs/method.md, "The cached pipeline").

Stages of one class:   structure -> prompts -> knowledge -> calibrate      keys
Evaluation of test set j by model version v, and the row of results of version v:
    features(j) -> routing(j, among classes 1..v; built on 1..v-1) -> scores(j, t) -> evaluate(j, v)
    evaluate(j, v) for every class j of v -> row(v)

Each module declares its `Stage` (what its artifacts depend on) and one `run_*` function:
a Runtime and small references (a TaskSource, digests, a ModelVersion) in, a StageRecord out.
"""
