"""The pre-training loop (transfer/pretrain/engine.py) on a tiny generated ImageFolder, on the CPU."""
import csv
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from transfer import REPO
from transfer.errors import UserError
from transfer.pretrain import config, engine
from transfer.pretrain.augment import TwoCropDataset, ViewSampler, moco_augmentation
from transfer.pretrain.moco import MoCo

from conftest import load_script

pytestmark = pytest.mark.slow  # trains, evaluates or runs tools on generated data: not in `make test-fast`


@pytest.fixture(scope="module")
def data(tmp_path_factory, colour_image_folder):
    return colour_image_folder(tmp_path_factory.mktemp("images"), per_class=8, val_per_class=3)  # 24 train images


def tiny(data, output, **overrides):
    """v2 settings at toy scale: 24 images, batch 8 (3 steps per epoch), 32 px, ResNet-18, on the CPU
    (where resume is promised bit-exact; also on a GPU machine)."""
    settings = dict(data=str(data), output=str(output), device="cpu", arch="resnet18", moco_k=24, batch_size=8,
                    epochs=1, image_size=32, workers=0, bn_splits=2, print_freq=1, monitor_every=0, knn_k=5)
    return config.load_config("v2", **(settings | overrides))


def log_rows(output):
    with open(Path(output) / "log.csv") as f:
        return list(csv.DictReader(f))


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def load_tool(name):
    return load_script(f"tools/{name}.py")


# ----------------------------------------------------------------------------- configuration


def test_presets_match_the_papers():
    v1, v2 = config.load_config("v1"), config.load_config("v2")
    assert (v1.moco_t, v1.mlp, v1.aug_plus, v1.cos) == (0.07, False, False, False)
    assert (v2.moco_t, v2.mlp, v2.aug_plus, v2.cos) == (0.2, True, True, True)
    for cfg in (v1, v2):
        assert (cfg.arch, cfg.moco_dim, cfg.moco_k, cfg.moco_m) == ("resnet50", 128, 65536, 0.999)
        assert (cfg.lr, cfg.batch_size, cfg.epochs, cfg.wd, cfg.momentum) == (0.03, 256, 200, 1e-4, 0.9)
    mlp = MoCo(__import__("torchvision").models.resnet50, mlp=True, K=256)
    assert mlp.encoder_q.fc[0].weight.shape == (2048, 2048) and mlp.encoder_q.fc[2].weight.shape == (128, 2048)


def test_official_flag_names_override_the_preset():
    tool = load_tool("pretrain_moco")
    args = vars(tool.parse_args(["--preset", "v2", "--arch", "resnet18", "--moco-k", "4096", "--moco-t", "0.1",
                                 "--no-mlp", "--schedule", "30", "40", "-b", "64", "--wd", "5e-4", "--epochs", "50"]))
    cfg = config.load_config(**args)
    assert (cfg.arch, cfg.moco_k, cfg.moco_t, cfg.mlp, cfg.schedule) == ("resnet18", 4096, 0.1, False, [30, 40])
    assert (cfg.batch_size, cfg.wd, cfg.epochs, cfg.aug_plus, cfg.cos) == (64, 5e-4, 50, True, True)  # rest: v2
    with pytest.raises(UserError, match="--preset v3"):
        config.load_config("v3")


def test_a_preset_file_that_is_not_a_yaml_mapping_is_a_user_error(tmp_path):
    (tmp_path / "broken.yaml").write_text("lr: [0.03\nepochs: 2\n")
    (tmp_path / "list.yaml").write_text("- 0.03\n")
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(UserError, match=r"broken.yaml: not valid YAML: .* at line 2, column 7$"):
        config.load_config(tmp_path / "broken.yaml")
    with pytest.raises(UserError, match="list.yaml: expected a mapping of pre-training settings, found a YAML list"):
        config.load_config(tmp_path / "list.yaml")
    with pytest.raises(UserError, match="empty.yaml: .*missing .* 'arch'"):
        config.load_config(tmp_path / "empty.yaml")


def test_bad_sizes_and_paths_are_user_errors(tmp_path, data):
    with pytest.raises(UserError, match="--moco-k 20: the queue size must be a multiple of --batch-size 8"):
        engine.pretrain(tiny(data, tmp_path / "a", moco_k=20))
    with pytest.raises(UserError, match="--bn-splits 3"):
        engine.pretrain(tiny(data, tmp_path / "b", bn_splits=3))
    with pytest.raises(UserError, match="train/<class>"):
        engine.pretrain(tiny(tmp_path / "nowhere", tmp_path / "c"))


def test_learning_rate_schedules():
    step = config.load_config("v1", lr=1.0, epochs=10, schedule=[4, 8])
    assert [round(engine.learning_rate(step, e), 6) for e in (0, 3, 4, 7, 8, 9)] == [1, 1, 0.1, 0.1, 0.01, 0.01]
    cos = config.load_config("v2", lr=1.0, epochs=10)
    assert engine.learning_rate(cos, 0) == 1.0 and engine.learning_rate(cos, 5) == pytest.approx(0.5)


# ----------------------------------------------------------------------------- data


def test_view_sampler_shards_epochs_and_resumes():
    full = list(ViewSampler(20, 8, 0, 1, seed=3, epochs=2))
    assert len(full) == 2 * 16  # two full batches per epoch, the remainder dropped
    for epoch in (0, 1):
        ids = full[epoch * 16:(epoch + 1) * 16]
        assert all(i // 20 == epoch for i in ids) and len({i % 20 for i in ids}) == 16
    assert full[:16] != [i - 20 for i in full[16:]]  # a new permutation every epoch
    ranks = [list(ViewSampler(20, 8, r, 2, seed=3, epochs=2)) for r in (0, 1)]
    interleaved = [i for b in range(4) for r in (0, 1) for i in ranks[r][b * 4:(b + 1) * 4]]
    assert interleaved == full  # each global batch = rank 0's slice + rank 1's slice
    assert list(ViewSampler(20, 8, 0, 1, seed=3, epochs=2, start_step=3)) == full[3 * 8:]


def test_views_are_a_function_of_their_id(data):
    dataset = TwoCropDataset(data / "train", moco_augmentation(32, aug_plus=True), seed=0)
    q1, k1, _ = dataset[5]
    torch.manual_seed(123)  # the global RNG does not matter
    q2, k2, _ = dataset[5]
    assert torch.equal(q1, q2) and torch.equal(k1, k2) and not torch.equal(q1, k1)
    assert torch.equal(dataset.key_view(5), k1)
    assert not torch.equal(dataset[5 + len(dataset)][0], q1)  # same image, next epoch: new crops


# ----------------------------------------------------------------------------- training runs


@pytest.fixture(scope="module")
def straight_run(data, tmp_path_factory):
    """2 epochs of 3 steps, start to end."""
    output = tmp_path_factory.mktemp("straight")
    return engine.pretrain(tiny(data, output, epochs=2)), output


def test_resume_continues_the_same_run_bit_for_bit(data, tmp_path, straight_run):
    checkpoint, straight = straight_run
    # Stop mid-epoch at step 4, resume (with loader workers this time: views do not depend on them).
    first = engine.pretrain(tiny(data, tmp_path, epochs=2, max_steps=4))
    assert load(first)["step"] == 4 and len(log_rows(tmp_path)) == 4
    engine.pretrain(tiny(data, tmp_path, epochs=2, workers=2, resume=str(first)))

    losses = [row["loss"] for row in log_rows(straight)]
    assert len(losses) == 6 and len(set(losses)) > 1
    assert [row["loss"] for row in log_rows(tmp_path)] == losses  # exact decimal strings: same floats
    a, b = load(checkpoint), load(tmp_path / "checkpoint_last.pth.tar")
    assert a["step"] == b["step"] == 6 and a["epoch"] == b["epoch"] == 2
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():  # both encoders, BN statistics, queue, queue_ptr
        assert torch.equal(value, b["state_dict"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])


def test_checkpoint_has_the_official_layout(straight_run):
    checkpoint, output = straight_run
    ckpt = load(checkpoint)  # weights_only: tensors and plain types only
    assert {"epoch", "arch", "state_dict", "optimizer"} <= ckpt.keys() and ckpt["arch"] == "resnet18"
    keys = ckpt["state_dict"].keys()
    assert all(k.startswith("module.") for k in keys)
    assert {"module.queue", "module.queue_ptr", "module.encoder_q.conv1.weight", "module.encoder_k.conv1.weight",
            "module.encoder_q.fc.0.weight", "module.encoder_q.fc.2.weight"} <= keys
    assert ckpt["state_dict"]["module.queue"].shape == (128, 24)
    # A checkpoint already in --output is not overwritten by accident.
    with pytest.raises(UserError, match="--resume"):
        engine.pretrain(config.load_config(**(ckpt["config"] | {"resume": None})))


def test_checkpoint_converts_with_the_official_renaming_rules(tmp_path):
    """The official converter (moco/detection/convert-pretrain-to-detectron2.py) keeps
    module.encoder_q.* and renames torchvision names to detectron2's; every ResNet-50 backbone
    tensor of detectron2 must come out of our checkpoint with its shape."""
    import torchvision
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone import build_resnet_backbone

    model = MoCo(torchvision.models.resnet50, K=256, mlp=True)
    optimizer = torch.optim.SGD(model.parameters(), 0.1)
    cfg = config.load_config("v2", batch_size=256, moco_k=256)
    engine.save_checkpoint(tmp_path / "ckpt.pth.tar", model, optimizer, cfg, step=10, steps_per_epoch=5, lr=0.1)
    state = load(tmp_path / "ckpt.pth.tar")["state_dict"]

    converted = {}
    for key, value in state.items():  # the official renaming rules, as documented there
        if not key.startswith("module.encoder_q."):
            continue
        key = key.replace("module.encoder_q.", "")
        if "layer" not in key:
            key = "stem." + key
        for i in (1, 2, 3, 4):
            key = key.replace(f"layer{i}", f"res{i + 1}")
        for i in (1, 2, 3):
            key = key.replace(f"bn{i}", f"conv{i}.norm")
        converted[key.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")] = value

    d2 = get_cfg()
    d2.MODEL.RESNETS.DEPTH, d2.MODEL.RESNETS.NORM, d2.MODEL.BACKBONE.FREEZE_AT = 50, "BN", 0  # the MoCo protocol
    d2.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    expected = build_resnet_backbone(d2, ShapeSpec(channels=3)).state_dict()
    assert {k for k in converted if not k.startswith("stem.fc")} == set(expected)
    assert all(converted[k].shape == v.shape for k, v in expected.items())


def test_monitors_knn_and_dictionary_consistency(data, tmp_path):
    # Whole-batch BN (bn_splits 1): re-encoding the newest queued batch must give back its keys.
    engine.pretrain(tiny(data, tmp_path, epochs=2, bn_splits=1, monitor_every=1))
    with open(tmp_path / "monitor.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]  # step 0: the random-init reference
    assert all(0 <= float(r["knn_top1"]) <= 100 for r in rows)
    with open(tmp_path / "dictionary_consistency.csv") as f:
        table = [r for r in csv.DictReader(f) if r["epoch"] == "2"]
    ages = {int(r["age_steps"]) for r in table}
    assert ages == {0, 1, 2}  # the queue holds 3 batches
    newest = [float(r["cosine"]) for r in table if r["age_steps"] == "0"]
    oldest = [float(r["cosine"]) for r in table if r["age_steps"] == "2"]
    assert min(newest) > 0.999 and sum(oldest) / len(oldest) < 0.999
    assert (tmp_path / "dictionary_consistency.png").stat().st_size > 1000
    assert any((tmp_path / "tb").iterdir())


# ----------------------------------------------------------------------------- torchrun-like, 2 processes


def _torchrun_worker(rank, port, data, output):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        engine.pretrain(tiny(data, output, max_steps=2, bn_splits=None))
    finally:
        torch.distributed.destroy_process_group()


def test_two_process_run_fills_the_queue_from_both_ranks(data, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_torchrun_worker, args=(port, str(data), str(tmp_path)), nprocs=2)
    ckpt = load(tmp_path / "checkpoint_last.pth.tar")
    assert ckpt["step"] == 2 and len(log_rows(tmp_path)) == 2
    # Queue slots 0..15 hold the two global batches in sampler order: rank 0's half, then rank 1's.
    expected = list(ViewSampler(24, 8, 0, 1, seed=0, epochs=1))[:16]
    assert ckpt["state_dict"]["module.queue_ids"][:16].tolist() == expected
    assert int(ckpt["state_dict"]["module.queue_ptr"]) == 16


# ----------------------------------------------------------------------------- tools/pretrain_moco.py defaults


def test_without_preset_or_data_a_cpu_gets_the_demo_preset_and_a_gpu_is_told_what_to_pass():
    choose = load_tool("pretrain_moco").choose_preset
    preset, note = choose(None, None, None, gpu=False)
    assert preset == "demo" and note.startswith("no GPU and no --preset/--data: running the demo preset")
    assert choose(None, None, "cpu", gpu=True)[0] == "demo"  # --device cpu on a GPU machine
    with pytest.raises(UserError, match=r"^no --data: pass --data DIR .* or --preset demo"):
        choose(None, None, None, gpu=True)
    assert choose(None, "/data/imagenet", None, gpu=True) == ("v2", None)
    assert choose("v2", None, None, gpu=False) == ("v2", None)  # asked for: as before
    assert choose("v1", None, None, gpu=True) == ("v1", None)


def test_pretrain_moco_without_arguments_trains_the_demo_preset_on_the_demo_images(tmp_path):
    """The command as typed, but for --max-steps: the whole demo run takes minutes on a busy CPU."""
    import subprocess
    import sys

    import yaml

    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", MOCO_TRANSFER_DEMO=str(tmp_path / "demo"))
    done = subprocess.run([sys.executable, str(REPO / "tools" / "pretrain_moco.py"), "--max-steps", "2"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == (
        "no GPU and no --preset/--data: running the demo preset on the built-in demo images "
        "(pass --preset v2 --data DIR for ImageNet settings)")
    run = tmp_path / "output" / "pretrain"
    demo_preset = yaml.safe_load((REPO / "configs" / "pretrain" / "demo.yaml").read_text())
    settings = yaml.safe_load((run / "config.yaml").read_text())
    assert {k: settings[k] for k in demo_preset} == demo_preset
    assert load(run / engine.CHECKPOINT)["step"] == 2


# ----------------------------------------------------------------------------- broken images


def with_bad_images(data, root, names):
    """A copy of ``data`` with undecodable files added to the first class folder of train/."""
    import shutil

    shutil.copytree(data, root)
    first_class = sorted((root / "train").iterdir())[0]
    for name in names:
        (first_class / name).write_bytes(b"\xff\xd8 this is not a JPEG")
    return root, [str(first_class / name) for name in names]


def test_an_undecodable_image_is_skipped_counted_and_resume_stays_bit_exact(data, tmp_path, capsys):
    from transfer.image_folder import SKIPPED

    root, bad = with_bad_images(data, tmp_path / "images", ["garbage.jpg"])  # 25 images: 3 steps of 8 per epoch
    straight = engine.pretrain(tiny(root, tmp_path / "straight", epochs=2))
    first = engine.pretrain(tiny(root, tmp_path / "resumed", epochs=2, max_steps=4))
    engine.pretrain(tiny(root, tmp_path / "resumed", epochs=2, workers=2, resume=str(first)))
    err = capsys.readouterr().err
    # One warning line the first time in each run, one total at each run's end.
    assert err.count(f"warning: {bad[0]}: cannot be decoded") == 2, err
    assert "1 image(s) could not be decoded and were replaced" in err
    for output in ("straight", "resumed"):
        assert (tmp_path / output / SKIPPED).read_text() == bad[0] + "\n"
        assert log_rows(tmp_path / output)[-1]["skipped_images"] == "1"
    assert [r["loss"] for r in log_rows(tmp_path / "straight")] == [r["loss"] for r in log_rows(tmp_path / "resumed")]
    a, b = load(straight), load(tmp_path / "resumed" / "checkpoint_last.pth.tar")
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key


def test_too_many_undecodable_images_stop_the_run_with_one_line(data, tmp_path):
    from transfer.image_folder import scan

    root, bad = with_bad_images(data, tmp_path / "images", ["bad1.jpg", "bad2.jpg", "bad3.jpg"])
    with pytest.raises(UserError, match=r"^[23] of 27 images cannot be decoded \(more than 1%\), e\.g\. .*bad\d\.jpg"):
        engine.pretrain(tiny(root, tmp_path / "run", epochs=3))  # each epoch visits 24 of the 27
    # --check-data finds them before any training: the same line, every bad file listed
    with pytest.raises(UserError, match=r"^3 of 27 images cannot be decoded"):
        scan(root / "train", tmp_path / "scan" / "skipped_images.txt")
    assert sorted((tmp_path / "scan" / "skipped_images.txt").read_text().split()) == sorted(bad)


def test_an_empty_class_folder_is_one_clear_line(data, tmp_path):
    import shutil

    shutil.copytree(data, tmp_path / "images")
    (tmp_path / "images" / "train" / "empty_class").mkdir()
    with pytest.raises(UserError) as error:
        engine.pretrain(tiny(tmp_path / "images", tmp_path / "run"))
    message = str(error.value)
    assert "\n" not in message and "empty_class" in message and message.startswith(str(tmp_path / "images" / "train"))


# ----------------------------------------------------------------------------- settings declared once


def test_every_setting_is_a_flag_with_its_help_and_the_new_ones_override_the_preset():
    import argparse

    tool = load_tool("pretrain_moco")
    p = argparse.ArgumentParser()
    config.add_arguments(p)
    defaults = vars(p.parse_args([]))
    assert set(defaults) == set(config.FIELDS) and all(v is None for v in defaults.values())  # None: keep the preset's
    assert all(f.metadata["help"] and config.flag(name) in p.format_help() for name, f in config.FIELDS.items())
    assert p.parse_args(["-b", "64", "--mechanism", "end_to_end"]).batch_size == 64
    with pytest.raises(SystemExit):
        p.parse_args(["--mechanism", "queue"])
    args = vars(tool.parse_args(["--preset", "demo", "--mechanism", "memory_bank", "--bank-m", "0.7", "--no-shuffle-bn",
                        "--small-stem", "--knn-max-images", "50", "--learning-rate", "0.1"]))
    cfg = config.load_config(**args)
    assert (cfg.mechanism, cfg.bank_m, cfg.shuffle_bn, cfg.small_stem, cfg.knn_max_images, cfg.lr) == \
        ("memory_bank", 0.7, False, True, 50, 0.1)
    assert config.load_config("demo").knn_max_images is None  # the whole splits unless asked


def test_a_preset_with_an_unknown_key_or_a_wrong_value_is_one_line_naming_the_file(tmp_path, capsys):
    demo = (REPO / "configs" / "pretrain" / "demo.yaml").read_text()
    (tmp_path / "typo.yaml").write_text(demo + "moco_q: 3\n")
    (tmp_path / "value.yaml").write_text(demo.replace("moco_m: 0.999", "moco_m: fast"))
    main = load_tool("pretrain_moco").main
    for name, message in (("typo", "unknown setting 'moco_q'"), ("value", "moco_m: expected a number, found 'fast'")):
        with pytest.raises(SystemExit) as exit_:
            main(["--preset", str(tmp_path / f"{name}.yaml"), "--output", str(tmp_path / "run")])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
        assert err.startswith(f"error: {tmp_path / name}.yaml: {message}")
    with pytest.raises(UserError, match=r"^--mechanism: expected one of moco, memory_bank, end_to_end, found 'queue'$"):
        config.load_config("demo", mechanism="queue")


# ----------------------------------------------------------------------------- mechanisms in the loop


def test_memory_bank_resume_is_bit_exact_with_the_monitors_on(data, tmp_path):
    bank = dict(mechanism="memory_bank", epochs=2, monitor_every=1)
    straight = engine.pretrain(tiny(data, tmp_path / "straight", **bank))
    first = engine.pretrain(tiny(data, tmp_path / "resumed", max_steps=4, **bank))
    engine.pretrain(tiny(data, tmp_path / "resumed", workers=2, resume=str(first), **bank))
    assert [r["loss"] for r in log_rows(tmp_path / "straight")] == [r["loss"] for r in log_rows(tmp_path / "resumed")]
    a, b = load(straight)["state_dict"], load(tmp_path / "resumed" / engine.CHECKPOINT)["state_dict"]
    assert a.keys() == b.keys() and {"module.memory", "module.memory_ids", "module.encoder_q.conv1.weight"} <= a.keys()
    assert not any(k.startswith("module.encoder_k") for k in a)
    for key, value in a.items():  # encoder, BN statistics, the bank, its ids and ages
        assert torch.equal(value, b[key]), key
    assert (a["module.memory_ids"] >= 0).all() and int(a["module.step"]) == 6
    with open(tmp_path / "straight" / "dictionary_consistency.csv") as f:
        ages = {int(r["age_steps"]) for r in csv.DictReader(f) if r["epoch"] == "2"}
    assert ages == {0, 1, 2}  # each image's row written 0, 1 or 2 steps before the monitor


def test_end_to_end_runs_in_the_same_loop_with_its_monitors(data, tmp_path):
    engine.pretrain(tiny(data, tmp_path, mechanism="end_to_end", moco_k=7, monitor_every=1))  # moco_k: unused
    with open(tmp_path / "monitor.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["0", "3"]
    assert all(float(r["dict_cosine"]) > 0.9999 for r in rows)  # its keys are encoded now, by construction
    assert all(float(r["dict_consistency"]) == pytest.approx(1 - float(r["feature_spread"]), abs=1e-4) for r in rows)
    assert (tmp_path / "similarity_matrix.png").stat().st_size > 5000
    assert not any(k.startswith("module.encoder_k") for k in load(tmp_path / engine.CHECKPOINT)["state_dict"])


def test_the_knn_monitor_uses_the_whole_splits_unless_capped_and_says_how_many(data, tmp_path):
    from transfer.pretrain import monitors

    train, val = engine.data_dirs(data)
    (bank, queries), classes, line = monitors.knn_loaders(train, val, tiny(data, tmp_path), 8)
    assert (len(bank.dataset), len(queries.dataset), classes) == (24, 9, 3)
    assert line == "k-NN monitor: all 24 train images as the bank, all 9 val images as queries"
    (bank, queries), _, line = monitors.knn_loaders(train, val, tiny(data, tmp_path, knn_max_images=6), 8)
    assert (len(bank.dataset), len(queries.dataset)) == (6, 6)
    assert line == "k-NN monitor: 6 of 24 train images as the bank, 6 of 9 val images as queries (--knn-max-images 6)"
