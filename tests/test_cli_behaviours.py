"""The `ucad` command's documented behaviours, black-box: exit codes, files on disk, the JSON it
writes, and the Python inspection API the README promises. Small settings (smoke preset, 64 px,
one epoch) keep the whole module to about a minute on two CPU cores."""

import contextlib
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score

from ucad.cli import main
from ucad.data.images import load_image, load_mask
from ucad.inference import Inspector
from ucad.store import ArtifactStore

ORDER = ["stripes", "nut"]  # not alphabetical: the order must come from --tasks
DECOY = ORDER[1]  # its test images are copies of stripes' test images (see `stream`)
CONFIG_FILE = {
    "epochs": 1,
    "image_size": 64,
    "key_size": 32,
    "knowledge_size": 48,
    "calibration_fraction": 0.25,
    "workers": 2,
}


def run(*args: str) -> tuple[int, str]:
    """`ucad ARGS` in this process; returns the exit code and what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([str(a) for a in args])
    return code, out.getvalue()


def benchmark_args(stream, model: str, *extra: str) -> list[str]:
    return [
        "benchmark",
        "--data",
        stream.data,
        "--tasks",
        ",".join(ORDER),
        "--model",
        model,
        "--preset",
        "smoke",
        "--config",
        stream.config_file,
        "--set",
        "knowledge_size=40",  # the command line wins over the file
        "--store",
        stream.store,
        *extra,
    ]


_INSPECTORS: dict[tuple[str, int | None], Inspector] = {}


def inspector(stream, ref: str, batch_size: int | None = None) -> Inspector:
    """A model version loaded once per module (loading builds the backbone)."""
    key = (f"{stream.store}:{ref}", batch_size)
    if key not in _INSPECTORS:
        _INSPECTORS[key] = Inspector.load(ArtifactStore(stream.store), ref, batch_size=batch_size)
    return _INSPECTORS[key]


@pytest.fixture(scope="module")
def stream(tmp_path_factory) -> SimpleNamespace:
    """A synthetic dataset made by `ucad synth`, and two benchmarks of it in one store:
    `plain` (--no-tracking) and `oracle` (--routing oracle, tracked where tracking goes by
    default; --strict-tracking makes a failure to log an error)."""
    root = tmp_path_factory.mktemp("cli")
    s = SimpleNamespace(root=root, synth=root / "synth", data=root / "data", store=root / "store")
    s.synth_code, s.synth_out = run("synth", s.synth, "--classes", "2", "--seed", "0")
    # The stream's data: the synthetic classes, but nut's test set is a copy of stripes' test
    # set, so by their keys nut's test images choose stripes: routing is visible in the figures.
    shutil.copytree(s.synth, s.data)
    for part in ("test", "ground_truth"):
        shutil.rmtree(s.data / DECOY / part)
        shutil.copytree(s.synth / ORDER[0] / part, s.data / DECOY / part)
    s.config_file = root / "small.yaml"
    s.config_file.write_text("".join(f"{k}: {v}\n" for k, v in CONFIG_FILE.items()))
    mlflow_db = s.store / "mlflow.db"
    with pytest.MonkeyPatch.context() as env:
        # the default tracking location only applies when nothing else names one
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        s.results = {}
        for model, extra in (
            ("plain", ["--no-tracking"]),
            ("oracle", ["--routing", "oracle", "--strict-tracking"]),  # default tracking place
        ):
            report = root / f"{model}.json"
            code, _ = run(*benchmark_args(s, model, *extra, "--json", str(report)))
            assert code == 0, f"benchmark {model} failed"
            s.results[model] = json.loads(report.read_text())
            if model == "plain":
                s.db_after_plain = mlflow_db.exists()
        s.db_after_oracle = mlflow_db.exists()
    return s


def test_synth_writes_the_classes_it_names(stream):
    assert stream.synth_code == 0
    named = stream.synth_out.split(": ", 1)[1].split()
    named = [n.strip(",") for n in named]
    assert sorted(named) == sorted(p.name for p in stream.synth.iterdir() if p.is_dir())
    assert sorted(named) == sorted(ORDER)
    for name in named:
        train = list((stream.synth / name / "train" / "good").glob("*.png"))
        tests = [p for p in (stream.synth / name / "test").glob("*/*.png")]
        defects = [p for p in tests if p.parent.name != "good"]
        assert len(train) >= 2 and len(tests) > len(defects) > 0
        for image in defects:  # MVTec layout: every defective image has its mask
            mask = stream.synth / name / "ground_truth" / image.parent.name
            mask = mask / f"{image.stem}_mask.png"
            with Image.open(image) as a, Image.open(mask) as m:
                assert a.size == m.size
                assert np.asarray(m).any()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["benchmark", "--data", "x", "--bogus"], "unrecognized arguments: --bogus"),
        (["add-task", "--model", "m", "--task", "t"], "the following arguments are required"),
        (["predict", "x.png"], "one of the arguments --model --onnx is required"),
        (["benchmark", "--data", "x", "--routing", "sideways"], "invalid choice: 'sideways'"),
        (["predict", "--model", "m", "x.png", "--batch-size", "many"], "invalid int value"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        ([], "the following arguments are required: COMMAND"),
    ],
)
def test_malformed_command_line_exits_2_with_usage(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("UCAD_STORE", raising=False)
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    out, err = capsys.readouterr()
    assert err.startswith("usage: ucad"), err
    assert message in err
    assert out == ""
    assert list(tmp_path.iterdir()) == []  # no store, no output, nothing


def test_malformed_command_line_is_exit_status_2_of_the_process(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "UCAD_STORE"}
    child = subprocess.run(
        [sys.executable, "-m", "ucad.cli", "benchmark", "--data", "x", "--bogus"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    assert child.returncode == 2, child.stderr
    # the command's own usage and name, not `ucad`'s top-level ones
    assert child.stderr.startswith("usage: ucad benchmark")
    assert "ucad benchmark: error: unrecognized arguments: --bogus" in child.stderr
    assert child.stdout == "" and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "set_"),
    [
        (["models", "-v"], {"verbose"}),
        (["-v", "models"], {"verbose"}),
        (["-q", "models"], {"quiet"}),  # not reset by the command's own (unset) option
        (["store", "verify", "--debug", "-q"], {"debug", "quiet"}),
        (["-q", "models", "-v"], {"verbose", "quiet"}),  # parsed; `main` refuses the pair
        (["models", "rm", "x", "--verbose"], {"verbose"}),
        (["predict", "--model", "m", "x.png", "-q"], {"quiet"}),
        (["models"], set()),
    ],
)
def test_general_options_count_before_and_after_the_command(args, set_):
    from ucad.cli import build_parser

    parsed = build_parser().parse_args(args)
    assert {name for name in ("verbose", "quiet", "debug") if getattr(parsed, name)} == set_


def test_verbose_and_quiet_together_are_refused(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["-q", "models", "-v"])
    assert exit_.value.code == 2
    assert "-v/--verbose and -q/--quiet cannot be used together" in capsys.readouterr().err


def test_unknown_option_of_a_nested_command_shows_that_command_s_usage(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["store", "verify", "--bogus"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: ucad store verify")
    assert "ucad store verify: error: unrecognized arguments: --bogus" in err


def test_models_lists_models_versions_and_classes(stream):
    code, out = run("models", "--store", stream.store)
    assert code == 0
    lines = out.splitlines()
    for model in ("oracle", "plain"):
        at = lines.index(model)
        v1, v2 = lines[at + 1].split(), lines[at + 2].split()
        assert v1[0] == "v1" and v1[-1] == ORDER[0]
        assert v2[0] == "v2" and " ".join(v2[-2:]) == f"{ORDER[0]}, {ORDER[1]}"
    assert [line for line in lines if not line.startswith(" ")] == ["oracle", "plain"]


def test_tasks_order_is_respected(stream):
    for result in stream.results.values():
        assert result["tasks"] == ORDER
        assert len(result["matrix"]["image_auroc"]) == 2
        assert result["matrix"]["image_auroc"][0][1] is None  # nut was not learned in row 0


def test_config_file_and_set_take_effect(stream):
    for result in stream.results.values():
        config = result["config"]
        for field in ("epochs", "image_size", "key_size", "calibration_fraction", "workers"):
            assert config[field] == CONFIG_FILE[field], field
        assert config["knowledge_size"] == 40  # --set beats the file's 48
        assert config["backbone"] == "vit_tiny_patch16_224"  # the preset, untouched by either
    # the stored model was built with them: its input crop is the file's 64 px
    model = inspector(stream, "plain").model
    assert model.config.image_size == 64 and model.geometry.crop == 64


def test_no_tracking_writes_no_mlflow_database_but_a_default_run_does(stream):
    assert not stream.db_after_plain
    assert stream.db_after_oracle
    with contextlib.closing(sqlite3.connect(stream.store / "mlflow.db")) as db:
        assert db.execute("SELECT COUNT(*) FROM runs").fetchone()[0] >= 1


def test_each_version_holds_the_classes_learned_so_far(stream):
    assert inspector(stream, "plain@1").model.task_names == ORDER[:1]
    assert inspector(stream, "plain").model.task_names == ORDER


def class_test_set(stream, name: str, geometry):
    """The class's test images cropped as the model sees them, labels and masks, by hand."""
    paths = sorted((stream.data / name / "test").glob("*/*.png"))
    labels = np.array([p.parent.name != "good" for p in paths])
    images = np.stack([geometry.image(load_image(p)) for p in paths])
    masks = []
    for path in paths:
        if path.parent.name == "good":
            masks.append(np.zeros(images.shape[1:3], bool))
        else:
            truth = stream.data / name / "ground_truth" / path.parent.name
            masks.append(geometry.mask(load_mask(truth / f"{path.stem}_mask.png")))
    return images, labels, np.stack(masks)


def test_oracle_routing_scores_each_class_with_its_own_memory(stream):
    """Oracle figures are those of each class's test images scored with that class's memory;
    agnostic figures those of the same images scored with the memory each image chooses. The
    decoy class's test images choose stripes, so the two differ there. Memories being frozen,
    oracle figures never change as classes are added: oracle forgetting is exactly zero."""
    oracle, agnostic = stream.results["oracle"], stream.results["plain"]
    assert oracle["routing"] == "oracle" and agnostic["routing"] == "agnostic"
    model = inspector(stream, "oracle").model
    assert model.task_names == ORDER
    for j, name in enumerate(ORDER):
        images, labels, masks = class_test_set(stream, name, model.geometry)
        figures = {}
        for t in (0, 1, None):  # each memory, then each image's own choice
            prediction = model.predict(images, task=t)
            if t is not None:
                assert prediction.tasks.tolist() == [t] * len(images)
            scores, maps = prediction.image_scores.numpy(), prediction.maps.numpy()
            figures[t] = {
                "image_auroc": roc_auc_score(labels, scores),
                "image_ap": average_precision_score(labels, scores),
                "pixel_ap": average_precision_score(masks.ravel(), maps.ravel()),
            }
        row = {metric: oracle["matrix"][metric][-1][j] for metric in figures[j]}
        assert row == pytest.approx(figures[j], rel=1e-4)
        row = {metric: agnostic["matrix"][metric][-1][j] for metric in figures[None]}
        assert row == pytest.approx(figures[None], rel=1e-4)
        # row j (when class j was learned) equals the last row for class j
        for metric in ("image_auroc", "image_ap", "pixel_ap", "aupro"):
            assert oracle["matrix"][metric][j][j] == oracle["matrix"][metric][-1][j]
    # the decoy's images went elsewhere by their keys, and its own memory scores them otherwise
    assert agnostic["matrix"]["routing_accuracy"][-1] == [1.0, 0.0]
    decoy = oracle["matrix"]["pixel_ap"][-1][1], agnostic["matrix"]["pixel_ap"][-1][1]
    assert abs(decoy[0] - decoy[1]) > 1e-3
    for metric in ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "aupro"):
        assert oracle["forgetting"][metric] == 0.0


def test_predict_device_and_batch_size_do_not_change_scores(stream):
    test = stream.data / ORDER[1] / "test"
    folders = [test / "good", sorted(p for p in test.iterdir() if p.name != "good")[0]]
    reports = []
    for extra in ([], ["--device", "cpu", "--batch-size", "3"]):
        report = stream.root / f"predict{len(reports)}.json"
        args = ["predict", "--model", "plain", *folders, "--store", stream.store]
        code, _ = run(*args, "--json", report, *extra)
        assert code == 0
        reports.append(json.loads(report.read_text())["images"])
    default, small = reports
    assert len(default) == sum(len(list(f.glob("*.png"))) for f in folders) > 3
    assert [r["path"] for r in small] == [r["path"] for r in default]
    for a, b in zip(default, small, strict=True):
        for field in ("task", "threshold", "anomalous"):
            assert a[field] == b[field], (a, b)
        assert a["score"] == pytest.approx(b["score"], rel=1e-5)


def test_iter_predict_yields_in_input_order_what_predict_returns(stream):
    paths = sorted((stream.data / ORDER[0] / "test").glob("*/*.png"))
    paths += sorted((stream.data / ORDER[1] / "test").glob("*/*.png"))
    paths = [paths[i] for i in np.random.default_rng(0).permutation(len(paths))[:8]]
    whole = inspector(stream, "plain").predict(paths)
    streamed = inspector(stream, "plain", batch_size=3).iter_predict(iter(paths))
    assert iter(streamed) is streamed  # an iterator: results come batch by batch
    streamed = list(streamed)
    assert len(streamed) == len(whole) == len(paths)
    for path, a, b in zip(paths, whole, streamed, strict=True):
        expected = np.asarray(load_image(path))
        np.testing.assert_array_equal(np.asarray(a.image), expected)  # input order
        np.testing.assert_array_equal(np.asarray(b.image), expected)
        assert (a.task, a.threshold, a.anomalous) == (b.task, b.threshold, b.anomalous)
        assert a.score == pytest.approx(b.score, rel=1e-5)
        np.testing.assert_allclose(a.map, b.map, rtol=1e-4, atol=1e-5)


def test_store_from_the_environment(stream, monkeypatch, tmp_path):
    """`UCAD_STORE` names the store when --store is absent."""
    monkeypatch.setenv("UCAD_STORE", str(stream.store))
    code, out = run("models")
    assert code == 0 and "plain" in out.splitlines()
    monkeypatch.setenv("UCAD_STORE", str(tmp_path / "empty"))
    code, _ = run("models")
    assert code == 1  # a store that does not exist is not listed as empty
    assert not (tmp_path / "empty").exists()  # listing never creates a store
    (tmp_path / "empty").mkdir()
    code, out = run("models")
    assert code == 0 and "plain" not in out.splitlines()


def test_version(capsys):
    from ucad import __version__

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"ucad {__version__}"


def test_output_to_a_closed_pipe_stops_quietly(tmp_path):
    """`ucad models | head -1`: the reader goes away; no error message, SIGPIPE's exit code."""
    child = subprocess.Popen(
        [sys.executable, "-m", "ucad.cli", "models", "--store", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    child.stdout.close()  # before the child, still importing, writes its line
    _, err = child.communicate(timeout=120)
    assert child.returncode == 141, err
    assert b"error" not in err.lower(), err
