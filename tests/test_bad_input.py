"""Bad input through the `ucad` command: a clear message naming the file or value, exit code 1,
and the artifact store exactly as it was (every file and folder, by content).

Formats that convert safely (grayscale, RGBA, 16-bit, palette) are accepted and logged instead.
"""

import ast
import hashlib
import json
import logging
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from ordinary_user import run_locked_out
from PIL import Image

from ucad.cli import main

SMOKE = ["--preset", "smoke", "--set", "epochs=1", "--set", "key_size=32"]
SMOKE += ["--set", "knowledge_size=64"]
SOURCES = [Path(__file__).parents[1] / name for name in ("ucad", "flows")]


def artifacts(store: Path) -> dict[str, str]:
    """The stage outputs and model manifests; MLflow's run log beside them may grow."""
    return {k: v for k, v in snapshot(store).items() if k.split("/")[0] in ("stages", "models")}


def snapshot(root: Path) -> dict[str, str]:
    """Every path under `root` with the sha256 of its content ("dir" for folders)."""
    if not root.exists():
        return {}
    if root.is_file():
        return {".": hashlib.sha256(root.read_bytes()).hexdigest()}
    return {
        str(path.relative_to(root)): (
            "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
        )
        for path in sorted(root.rglob("*"))
    }


def refused(capsys, store: Path, *args: str) -> str:
    """Run `ucad ARGS`: it must exit 1 with one error line and leave `store` untouched."""
    before = snapshot(store)
    code = main(list(args))
    err = capsys.readouterr().err
    assert code == 1, err
    assert err.startswith("ucad: error: "), err
    assert snapshot(store) == before
    return err


def add_task(store: Path, data: Path, *extra: str, model: str = "fresh", task: str = "grain"):
    return ["add-task", "--model", model, "--task", task, "--data", str(data)] + [
        "--store",
        str(store),
        *SMOKE,
        *extra,
    ]


def predict(store: Path, *paths, model: str = "m") -> list[str]:
    return ["predict", "--model", model, *map(str, paths), "--store", str(store)]


class Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def learned(tmp_path_factory, synth_root) -> SimpleNamespace:
    """Model `m` = [grain], learned from a copy of the synthetic class whose first four training
    images were saved as grayscale, RGBA, 16-bit grayscale and palette PNGs (converted, logged)."""
    root = tmp_path_factory.mktemp("bad-input")
    shutil.copytree(synth_root / "grain", root / "data" / "grain")
    train = root / "data" / "grain" / "train" / "good"
    originals = sorted(train.iterdir())[:4]
    converted = write_converted_formats(train, originals)
    for path in originals:
        path.unlink()
    logger, handler = logging.getLogger("ucad"), Messages()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        assert main(add_task(root / "store", root / "data", model="m")) == 0
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return SimpleNamespace(
        store=root / "store", data=root / "data", converted=converted, log=handler.messages
    )


@pytest.fixture
def store(learned, tmp_path) -> Path:
    return Path(shutil.copytree(learned.store, tmp_path / "store"))


@pytest.fixture
def data(synth_root, tmp_path) -> Path:
    """A private copy of the class `grain`, free to damage."""
    shutil.copytree(synth_root / "grain", tmp_path / "data" / "grain")
    return tmp_path / "data"


def first(folder: Path) -> Path:
    return sorted(p for p in folder.iterdir() if p.is_file())[0]


def damage(path: Path, kind: str) -> None:
    if kind == "corrupt":
        path.write_bytes(b"this is not an image at all")
    elif kind == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "empty file":
        path.write_bytes(b"")
    else:  # tiny
        Image.new("RGB", (16, 12), "gray").save(path)


DAMAGE = {
    "corrupt": "cannot read image",
    "truncated": "cannot read image",
    "empty file": "cannot read image",
    "tiny": "image is 16x12 px, smaller than the minimum of 32 px",
}


# Images and masks ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", DAMAGE)
@pytest.mark.parametrize("where", ["train/good", "test/good", "test/crack"])
def test_broken_image_stops_add_task_before_anything_is_written(capsys, store, data, where, kind):
    # test images are first read by the evaluation, after a version would have been written
    broken = first(data / "grain" / where)
    damage(broken, kind)
    err = refused(capsys, store, *add_task(store, data))
    assert str(broken) in err and DAMAGE[kind] in err


@pytest.mark.parametrize("kind", DAMAGE)
def test_broken_image_stops_predict(capsys, store, data, kind):
    broken = first(data / "grain" / "test" / "good")
    damage(broken, kind)
    err = refused(capsys, store, *predict(store, data / "grain" / "test"))
    assert str(broken) in err and DAMAGE[kind] in err


def test_broken_image_leaves_the_heat_maps_of_the_last_good_run(capsys, store, data, tmp_path):
    """Maps are named only when every image was scored: a run that stops on a broken image
    leaves neither a partial set nor temporaries, and the maps of an earlier run unchanged."""
    out = tmp_path / "maps"
    assert main([*predict(store, data / "grain" / "test"), "--out", str(out)]) == 0
    earlier = snapshot(out)
    assert len(earlier) > 4
    images = sorted(p for p in (data / "grain" / "test").rglob("*.png"))
    damage(images[-1], "truncated")  # the last image: the maps of the others are written first
    args = [*predict(store, data / "grain" / "test"), "--out", str(out)]
    assert str(images[-1]) in refused(capsys, store, *args)
    assert snapshot(out) == earlier


def test_predict_removes_overlays_a_killed_run_left_half_written(store, data, tmp_path):
    """A run killed with -9 cannot clean up; the next run into the same folder removes its
    temporaries, but not those of a run still going or of another host."""
    import socket
    import subprocess
    import sys

    from ucad.store_files import owner

    out = tmp_path / "maps"
    (out / "sub").mkdir(parents=True)
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    host = socket.gethostname().replace("-", "_")
    dead = out / "sub" / f".a.png.heatmap.png.{host}-{int(gone.stdout)}.partial"
    alive = out / f".b.png.heatmap.png.{owner()}.partial"  # this process: still running
    remote = out / ".c.png.heatmap.png.another_host-1.partial"
    unrelated = out / "sub" / f".notes.txt.{host}-{int(gone.stdout)}.partial"
    impossible = out / f".d.png.heatmap.png.{host}-9999999999.partial"  # no such pid: no crash
    for path in (dead, alive, remote, unrelated, impossible):
        path.write_bytes(b"half a PNG")
    assert main([*predict(store, data / "grain" / "test"), "--out", str(out)]) == 0
    assert not dead.exists() and not impossible.exists()
    assert alive.exists() and remote.exists() and unrelated.exists()
    assert len(list(out.rglob("*.heatmap.png"))) > 4


def test_mask_of_another_size_is_refused(capsys, store, data):
    mask = first(data / "grain" / "ground_truth" / "crack")
    Image.open(mask).resize((100, 80)).save(mask)
    err = refused(capsys, store, *add_task(store, data))
    assert str(mask) in err and "mask is 100x80 px but its image" in err


def test_missing_mask_is_refused(capsys, store, data):
    mask = first(data / "grain" / "ground_truth" / "hole")
    mask.unlink()
    err = refused(capsys, store, *add_task(store, data))
    assert str(mask) in err and "has no mask" in err


@pytest.mark.parametrize(
    ("folder", "message"),
    [
        ("", "train/good: folder not found"),
        ("train/good", "no training images"),
        ("test", "no test images"),
    ],
)
def test_empty_class_folder_is_refused(capsys, store, data, folder, message):
    empty = data / "grain" / folder
    shutil.rmtree(empty)
    empty.mkdir()
    err = refused(capsys, store, *add_task(store, data))
    assert str(empty) in err and message in err


def test_one_training_image_leaves_none_to_calibrate_with(capsys, store, data):
    train = data / "grain" / "train" / "good"
    for path in sorted(train.iterdir())[1:]:
        path.unlink()
    err = refused(capsys, store, *add_task(store, data))
    assert str(train) in err and "at least 2 are needed" in err


def test_empty_folder_or_missing_path_stops_predict(capsys, store, tmp_path):
    (tmp_path / "empty").mkdir()
    err = refused(capsys, store, *predict(store, tmp_path / "empty"))
    assert f"{tmp_path / 'empty'}: no images" in err
    err = refused(capsys, store, *predict(store, tmp_path / "nowhere.png"))
    assert f"{tmp_path / 'nowhere.png'}: no such file or folder" in err


def test_benchmark_checks_every_class_before_learning_the_first(capsys, store, data, synth_root):
    shutil.copytree(synth_root / "nut", data / "nut")
    broken = first(data / "nut" / "test" / "good")  # "nut" is learned after "grain"
    damage(broken, "truncated")
    args = ["benchmark", "--data", str(data), "--model", "b", "--store", str(store), *SMOKE]
    err = refused(capsys, store, *args)
    assert str(broken) in err


# Formats that are converted, not refused ---------------------------------------------------------


def write_converted_formats(folder: Path, sources: list[Path]) -> dict[str, Path]:
    """The four `sources` as grayscale, RGBA, 16-bit grayscale and palette PNGs in `folder`."""
    paths = {}
    for mode, source in zip(("L", "RGBA", "I;16", "P"), sources, strict=True):
        rgb = Image.open(source).convert("RGB")
        if mode == "I;16":
            image = Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)
        elif mode == "P":
            image = rgb.convert("P", palette=Image.Palette.ADAPTIVE)
        else:
            image = rgb.convert(mode)
        paths[mode] = folder / f"{source.stem}_{mode.replace(';', '')}.png"
        image.save(paths[mode])
    return paths


def assert_converted(messages: list[str], paths: dict[str, Path]) -> None:
    for mode, path in paths.items():
        # 16-bit PNGs open as I;16 or as I, depending on the Pillow version
        converted = r"I(;16)?" if mode == "I;16" else re.escape(mode)
        pattern = rf"{re.escape(str(path))}: converting {converted} image to RGB"
        assert any(re.fullmatch(pattern, message) for message in messages), (mode, messages)


def test_converted_formats_are_learned_and_logged(learned):
    assert_converted(learned.log, learned.converted)


def test_converted_formats_are_predicted_and_logged(caplog, capsys, store, data, tmp_path):
    caplog.set_level(logging.INFO)
    (tmp_path / "in").mkdir()
    paths = write_converted_formats(tmp_path / "in", [first(data / "grain" / "test" / "crack")] * 4)
    before = snapshot(store)
    assert main(predict(store, tmp_path / "in")) == 0, capsys.readouterr().err
    assert "4 images" in capsys.readouterr().out
    assert_converted([r.getMessage() for r in caplog.records], paths)
    assert snapshot(store) == before


# Models, classes and names ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("nope", "no model 'nope' in store"),
        ("m@7", "model 'm' has no version 7; it has [1]"),
        ("m@0", "invalid model version '0' in 'm@0'"),
        ("m@latest", "invalid model version 'latest' in 'm@latest'"),
        ("m@", "invalid model version '' in 'm@'"),
    ],
)
def test_unknown_model_or_version_stops_predict(capsys, store, data, model, message):
    err = refused(capsys, store, *predict(store, data / "grain" / "test", model=model))
    assert message in err


@pytest.mark.parametrize("name", ["../x", "/tmp/escaped", "..", "a/b", ".hidden", ""])
def test_model_names_that_leave_the_store_are_refused(capsys, store, data, name):
    err = refused(capsys, store, *predict(store, data / "grain" / "test", model=name))
    assert f"invalid model name {name!r}" in err
    err = refused(capsys, store, *add_task(store, data, model=name))
    assert f"invalid model name {name!r}" in err


@pytest.mark.parametrize("name", ["../grain", "/etc", "..", "grain/train"])
def test_class_names_that_leave_the_dataset_are_refused(capsys, store, data, name):
    err = refused(capsys, store, *add_task(store, data, task=name))
    assert f"invalid class name {name!r}" in err


def test_known_class_with_other_data_is_refused(capsys, store, data):
    for path in sorted((data / "grain" / "train" / "good").iterdir())[:2]:
        path.unlink()
    err = refused(capsys, store, *add_task(store, data, model="m"))
    assert "class 'grain' is already in model 'm' (version 1) with other data" in err
    assert str(data) in err


def test_known_class_with_another_config_is_refused(capsys, store, learned):
    err = refused(capsys, store, *add_task(store, learned.data, "--set", "epochs=2", model="m"))
    assert "model 'm' was built with another config (epochs: 1 -> 2)" in err


def test_identical_request_is_a_no_op(capsys, store, learned):
    before = artifacts(store)
    assert main(add_task(store, learned.data, model="m")) == 0
    assert "model m version 1 (unchanged)" in capsys.readouterr().out
    assert artifacts(store) == before and before


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("nope=1.5", "threshold given for class 'nope', which model 'm' version 1 does not have"),
        ("grain=high", "--threshold 'grain=high': 'high' is not a number"),
        ("grain", "--threshold expects CLASS=VALUE, got 'grain'"),
        ("grain=nan", "threshold for class 'grain' must be a finite number"),
    ],
)
def test_bad_threshold_override_is_refused(capsys, store, data, override, message):
    args = predict(store, data / "grain" / "test") + ["--threshold", override]
    assert message in refused(capsys, store, *args)


@pytest.mark.parametrize(
    ("field", "extra", "message"),
    [
        ("sam_checkpoint", ["--set", "structure=sam"], "SAM checkpoint not found (sam_checkpoint)"),
        (
            "weights_file",
            ["--set", "pretrained=true"],
            "backbone weights file not found (weights_file)",
        ),
    ],
)
def test_missing_weights_file_names_the_field(capsys, store, data, tmp_path, field, extra, message):
    missing = tmp_path / "nope.pth"
    err = refused(capsys, store, *add_task(store, data, *extra, "--set", f"{field}={missing}"))
    assert f"{missing}: {message}" in err


# The store itself -----------------------------------------------------------------------------


def test_store_that_is_a_file_is_refused_by_every_command(capsys, tmp_path, data):
    store = tmp_path / "store"
    store.write_text("not a folder")
    for args in (
        ["models", "--store", str(store)],
        predict(store, data / "grain" / "test"),
        add_task(store, data),
    ):
        assert f"artifact store {str(store)!r} is not a folder" in refused(capsys, store, *args)


READ_ONLY_COMMANDS = (
    ["models"],
    ["models", "rm", "m"],
    ["store", "verify"],
    ["store", "prune"],
    ["export", "--model", "m", "--out", "exported"],
)


def test_missing_store_is_refused_by_commands_that_only_read(capsys, tmp_path, data):
    """A mistyped --store is an error, not an empty store that verifies."""
    store = tmp_path / "no-such-store"
    commands = [[*args, "--store", str(store)] for args in READ_ONLY_COMMANDS]
    for args in [*commands, predict(store, data / "grain" / "test")]:
        assert "does not exist" in refused(capsys, store, *args)
        assert not store.exists()


def test_folder_that_is_not_a_store_is_refused_by_commands_that_only_read(capsys, data):
    for args in [*READ_ONLY_COMMANDS, ["predict", "--model", "m", str(data)]]:
        err = refused(capsys, data, *args, "--store", str(data))
        assert f"{str(data)!r} is not an artifact store" in err


def test_empty_folder_is_an_empty_store(capsys, tmp_path):
    assert main(["models", "--store", str(tmp_path)]) == 0
    assert main(["store", "verify", "--store", str(tmp_path)]) == 0
    assert "no models in" in capsys.readouterr().out


def test_store_url_without_a_filesystem_is_refused(capsys, tmp_path, data):
    err = refused(capsys, tmp_path / "unused", *predict("nosuch://bucket/ucad", data))
    assert "cannot open artifact store 'nosuch://bucket/ucad'" in err


# Root reads any folder: the permission check runs in a child held to file permissions
# (tests/ordinary_user.py).
UNREADABLE_STORE = """
import contextlib, io, json, sys
from ucad.cli import main
outcomes = []
for args in json.loads(sys.argv[2]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(args)
    outcomes.append([code, err.getvalue()])
print("OUTCOMES " + json.dumps(outcomes))
"""


def test_unreadable_store_is_refused(store, data):
    before = snapshot(store)
    commands = [
        ["models", "--store", str(store)],
        predict(store, data),
        add_task(store, data),
    ]
    child = run_locked_out(UNREADABLE_STORE, store, json.dumps(commands))
    assert child.returncode == 0, child.stderr[-3000:]
    (line,) = [x for x in child.stdout.splitlines() if x.startswith("OUTCOMES ")]
    outcomes = json.loads(line.removeprefix("OUTCOMES "))
    assert len(outcomes) == len(commands)
    for args, (code, err) in zip(commands, outcomes, strict=True):
        assert code == 1, (args, err)
        assert err.startswith("ucad: error: "), (args, err)
        assert f"artifact store {str(store)!r} is not readable" in err, (args, err)
    assert snapshot(store) == before


# Nothing is unpickled ---------------------------------------------------------------------------


def unsafe_loads(source: str) -> list[str]:
    """Calls and imports in `source` that could unpickle: pickle-family imports, torch.load
    without weights_only=True, numpy loads with allow_pickle=True."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [alias.name for alias in node.names] + [getattr(node, "module", None) or ""]
            found += [n for n in names if n.split(".")[0] in ("pickle", "dill", "cloudpickle")]
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        keywords = {k.arg: getattr(k.value, "value", None) for k in node.keywords}
        owner = getattr(node.func.value, "id", None)
        if (
            owner == "torch"
            and node.func.attr == "load"
            and keywords.get("weights_only") is not True
        ):
            found.append(f"line {node.lineno}: torch.load without weights_only=True")
        if owner in ("np", "numpy") and keywords.get("allow_pickle") is True:
            found.append(f"line {node.lineno}: numpy load with allow_pickle=True")
    return found


def test_the_scan_finds_unsafe_loads():
    source = "import pickle\nimport torch\ntorch.load(f)\nnp.load(f, allow_pickle=True)\n"
    assert len(unsafe_loads(source)) == 3
    assert unsafe_loads("torch.load(f, map_location='cpu', weights_only=True)\n") == []


def test_nothing_in_the_sources_unpickles():
    files = sorted(f for folder in SOURCES if folder.is_dir() for f in folder.rglob("*.py"))
    assert files
    problems = {str(f): unsafe_loads(f.read_text()) for f in files}
    assert {f: p for f, p in problems.items() if p} == {}
