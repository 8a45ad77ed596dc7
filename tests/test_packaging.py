"""castling_det as another Detectron2 project uses it: a wheel installed in a fresh virtual
environment, configs found through the package, Detectron2's own trainer and predictor."""
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

import castling_det
from castling_det import detectron2_check, model_zoo

REPO = Path(__file__).resolve().parents[1]

INSTALLED_USE = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import numpy as np
    import torch
    from detectron2.data.datasets import register_coco_instances
    from detectron2.engine import DefaultPredictor, DefaultTrainer

    import castling_det
    from castling_det import model_zoo
    from castling_det.data import make_shapes_dataset
    from castling_det.modeling.native_attention import native_attention_available

    work = Path(sys.argv[1])
    assert Path(castling_det.__file__).is_relative_to(work / "venv"), castling_det.__file__
    (train_json, train_dir), _ = make_shapes_dataset(work / "data", num_train=4, num_val=1, image_size=96, seed=0).values()
    register_coco_instances("installed_train", {}, str(train_json), str(train_dir))

    cfg = model_zoo.get_config("Shapes/mask_rcnn_castling_vit_ti_fpn_shapes.yaml")
    assert Path(model_zoo.get_config_file("Shapes/mask_rcnn_castling_vit_ti_fpn_shapes.yaml")).is_relative_to(work / "venv")
    cfg.merge_from_list([
        "DATASETS.TRAIN", ("installed_train",), "DATASETS.TEST", (), "SOLVER.MAX_ITER", 2,
        "SOLVER.IMS_PER_BATCH", 2, "DATALOADER.NUM_WORKERS", 0, "MODEL.CASTLING.DEPTH", 1,
        "INPUT.MIN_SIZE_TRAIN", (96,), "INPUT.MAX_SIZE_TRAIN", 96, "INPUT.MIN_SIZE_TEST", 96,
        "INPUT.MAX_SIZE_TEST", 96, "OUTPUT_DIR", str(work / "out"), "MODEL.DEVICE", "cpu",
    ])
    trainer = DefaultTrainer(cfg)  # Detectron2's stock trainer
    trainer.resume_or_load(resume=False)
    trainer.train()

    cfg.MODEL.WEIGHTS = str(work / "out" / "model_final.pth")
    predictor = DefaultPredictor(cfg)
    # The native CPU operator's source ships in the wheel and builds from there.
    assert native_attention_available(torch.zeros(1, 1, 4, 8))
    attentions = castling_det.modeling.branch_modules(predictor.model)
    assert attentions and not any(m.branch_active for m in attentions)  # deployed: branch off
    outputs = predictor(np.zeros((96, 96, 3), dtype=np.uint8))
    print("installed use ok:", len(outputs["instances"]), "detections")
    """
)

# Every console command the installed wheel declares, loaded and asked for --help in this one
# process (a process per command would import torch and Detectron2 each time); prints the names.
INSTALLED_COMMANDS = textwrap.dedent(
    """
    import contextlib, io, sys
    from importlib.metadata import entry_points

    commands = sorted(
        (e for e in entry_points(group="console_scripts") if e.value.startswith("castling_det.")),
        key=lambda e: e.name,
    )
    for command in commands:
        sys.argv = [command.name, "--help"]
        shown = io.StringIO()
        with contextlib.redirect_stdout(shown):
            try:
                command.load()()
            except SystemExit as stop:
                assert stop.code in (None, 0), (command.name, stop.code)
        assert "usage:" in shown.getvalue(), (command.name, shown.getvalue()[-500:])
    print(*(command.name for command in commands))
    """
)


def test_wheel_in_a_fresh_venv_gives_configs_trainer_predictor_and_commands(tmp_path):
    # Without PYTHONPATH, which could put a checkout ahead of the installed wheel.
    env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    run = lambda *cmd, **kw: subprocess.run(  # noqa: E731
        [str(c) for c in cmd], capture_output=True, text=True, timeout=600, env=env, **kw
    )
    built = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", REPO)
    assert built.returncode == 0, built.stderr[-3000:]
    wheel = next((tmp_path / "dist").glob("castling_det-*.whl"))

    venv = tmp_path / "venv"
    assert run(sys.executable, "-m", "venv", venv).returncode == 0
    python = venv / "bin" / "python"
    # Dependencies (torch, Detectron2, ...) come from this environment's site-packages; a path
    # added by a .pth file is not a site directory, so this checkout's editable install stays out.
    venv_site = run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    Path(venv_site, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = run(python, "-m", "pip", "install", "--no-deps", "--no-index", wheel)
    assert installed.returncode == 0, installed.stderr[-3000:]

    script = tmp_path / "use_installed.py"
    script.write_text(INSTALLED_USE)
    used = run(python, script, tmp_path, cwd=tmp_path)  # outside the checkout
    assert used.returncode == 0, used.stdout[-2000:] + used.stderr[-4000:]
    assert "installed use ok" in used.stdout

    helped = run(python, "-c", INSTALLED_COMMANDS, cwd=tmp_path)
    assert helped.returncode == 0, helped.stderr[-3000:]
    listed = helped.stdout.split()
    assert {"castling-train", "castling-benchmark", "castling-model-zoo", "castling-plot-metrics"} <= set(listed)
    assert all((venv / "bin" / command).is_file() for command in listed), listed
    # One generated script run as a user would: the wrapper pip wrote reaches the entry point.
    zoo = run(venv / "bin" / "castling-model-zoo", "--help", cwd=tmp_path)
    assert zoo.returncode == 0 and "usage:" in zoo.stdout, zoo.stderr[-2000:]


def test_every_config_is_found_through_the_package():
    configs = model_zoo.list_configs()
    on_disk = sorted(
        str(p.relative_to(REPO / "configs"))
        for p in [*(REPO / "configs").rglob("*.yaml"), *(REPO / "configs").glob("lazy/*.py")]
    )
    assert configs == on_disk and len(configs) > 30
    assert model_zoo.get_config("COCO-Detection/retinanet_castling_vit_s_fpn_3x.yaml").MODEL.META_ARCHITECTURE == "RetinaNet"
    assert model_zoo.get_config("lazy/mask_rcnn_castling_vit_b_100ep.py").train.max_iter == 184375
    with pytest.raises(FileNotFoundError, match="no_such.yaml"):
        model_zoo.get_config_file("COCO-Detection/no_such.yaml")


def test_version_has_one_source():
    setup_py = (REPO / "setup.py").read_text()
    assert "castling_det/__init__.py" in setup_py and castling_det.__version__ not in setup_py


def test_too_old_detectron2_is_named(monkeypatch):
    from detectron2.modeling import backbone

    monkeypatch.delattr(backbone, "SimpleFeaturePyramid")
    with pytest.raises(ImportError, match="SimpleFeaturePyramid") as error:
        detectron2_check.check_detectron2()
    assert "main branch" in str(error.value) and "detectron2 " in str(error.value)


def test_missing_detectron2_is_named(monkeypatch):
    real_import = detectron2_check.importlib.import_module

    def without_detectron2(name, *args):
        if name == "detectron2":
            raise ModuleNotFoundError("No module named 'detectron2'")
        return real_import(name, *args)

    monkeypatch.setattr(detectron2_check.importlib, "import_module", without_detectron2)
    with pytest.raises(ImportError, match="detectron2 is not installed"):
        detectron2_check.check_detectron2()
