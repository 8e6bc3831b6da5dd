"""Bad input everywhere: every verb against a table of bad arguments and bad files gives exit code 2 and one
`ditkit VERB: error: ...` line (argparse's own errors: usage, then that line), never a traceback; and a
property-based search (hypothesis) over argument combinations finds no traceback either.

Cases already covered elsewhere (test_train guard rails, test_sample/test_convert/test_data_* argument tests)
are not repeated; this table adds the files a stranger could hand over and the cross-verb checks.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ditkit
from ditkit.cli import main
from ditkit.weights.checkpoints import save_model
from helpers.vae import make_tiny_vae


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Iterator[dict[str, Path]]:
    """Good and bad inputs, made once."""
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("bad")
    torch.manual_seed(0)
    tiny = ditkit.create_model("DiT-S/2", input_size=8, in_channels=1, num_classes=10, depth=2, hidden_size=64,
                               num_heads=4)
    save_model(tiny, base / "tiny.safetensors")
    for name, bad in (("nan", float("nan")), ("inf", float("inf"))):  # a diverged run's weights
        broken = copy.deepcopy(tiny)
        with torch.no_grad():
            broken.blocks[1].mlp.fc1.weight[3, 5] = bad
        save_model(broken, base / f"{name}_weights.safetensors")
    (base / "text.pt").write_text("this is not a checkpoint\n")
    (base / "garbage.pt").write_bytes(b"\x80\x04garbage")
    torch.save({"model": {"pos_embed": torch.zeros(3)}}, base / "not_dit.pt")
    torch.save({"w": torch.zeros(2, dtype=torch.int64)}, base / "int_weights.pt")
    images = base / "unreadable" / "cls"
    images.mkdir(parents=True)
    (images / "a.png").write_bytes(b"not a png at all")
    (images / "b.jpg").write_bytes(b"\xff\xd8\xff truncated jpeg")
    (base / "empty").mkdir()
    wrong_vae = base / "wrong_vae"  # a config of another class and no weights: the wrong layout
    wrong_vae.mkdir()
    (wrong_vae / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    np.savez(base / "float.npz", arr_0=np.zeros((3, 8, 8, 3), np.float32))
    np.savez(base / "no_arr0.npz", other=np.zeros(3))
    (base / "zip_garbage.npz").write_text("zz")
    from PIL import Image

    (base / "one_image").mkdir()
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(base / "one_image" / "only.png")
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(base / "picture.png")
    # Small tensors whose stored config claims 10^12 classes: building that model would need petabytes.
    save_model(tiny, base / "huge_classes.safetensors",
               metadata={"ditkit_config": json.dumps({**tiny.config.to_dict(), "num_classes": 10**12})})
    make_tiny_vae(base / "vae8")
    torch.save({"w": torch.zeros(2), "payload": _Payload()}, base / "payload.pt")  # never runs: weights_only
    readonly, mounted = _readonly_folder(base / "ro")
    yield {"base": base, "tiny": base / "tiny.safetensors", "readonly": readonly}
    if mounted:
        subprocess.run(["umount", str(readonly)], check=False)


class _Payload:
    """An object whose unpickling would call os.system: what a malicious checkpoint carries."""

    def __reduce__(self):
        return (os.system, ("true",))


def _readonly_folder(path: Path) -> tuple[Path | None, bool]:
    """A folder nobody may write into, and whether it is a mount: a read-only tmpfs (root), else mode 0555
    (others); None if neither."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,ro", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode == 0:
        return path, True
    if os.geteuid() != 0:  # root writes through mode bits, so 0555 stops only others
        path.chmod(0o555)
        return path, False
    return None, False


def _cases() -> list[tuple[str, list[str], str]]:
    """(id, argv with {B} for the files folder, {T} for the tiny checkpoint and {RO} for a read-only folder,
    regex the error must match)."""
    cases = [
        ("flops-size-0", ["flops", "--image-size", "0"], "--image-size must be a positive multiple of 8"),
        ("flops-size-neg", ["flops", "--image-size", "-16"], "--image-size must be a positive multiple of 8"),
        ("flops-size-type", ["flops", "--image-size", "big"], "invalid int value: 'big'"),
        ("flops-model", ["flops", "--model", "DiT-H/2"], "invalid choice: 'DiT-H/2'"),
        ("extract-missing", ["extract", "{B}/nope", "--out", "{B}/o1"], "image folder not found"),
        ("extract-file-not-folder", ["extract", "{T}", "--out", "{B}/o2"], "image folder not found"),
        ("extract-workers", ["extract", "{B}/unreadable", "--out", "{B}/o3", "--workers", "-1"], "--workers must be"),
        ("extract-device", ["extract", "{B}/unreadable", "--out", "{B}/o4", "--device", "gpu7"], "bad --device"),
        ("extract-vae-empty", ["extract", "{B}/unreadable", "--out", "{B}/o5", "--vae", "{B}/empty", "--device",
                               "cpu"], "cannot load the VAE: the folder .* holds no loadable AutoencoderKL"),
        ("extract-vae-layout", ["extract", "{B}/unreadable", "--out", "{B}/o6", "--vae", "{B}/wrong_vae",
                                "--device", "cpu"], "cannot load the VAE"),
        ("train-steps-0", ["train", "--data-path", "digits", "--max-steps", "0"], "--max-steps must be at least 1"),
        ("train-size-neg", ["train", "--data-path", "digits", "--image-size", "-8", "--model", "DiT-S/8"],
         "--image-size must be positive"),
        ("train-size-type", ["train", "--data-path", "digits", "--image-size", "8.5"], "invalid int value"),
        ("train-missing-data", ["train", "--data-path", "{B}/nope", "--model", "DiT-S/8"], "does not exist"),
        ("train-labels", ["train", "--data-path", "digits", "--model", "DiT-S/8", "--image-size", "8",
                          "--num-classes", "3", "--results-dir", "{B}/r1"], "label 9 but --num-classes is 3"),
        ("train-resume-missing", ["train", "--data-path", "digits", "--model", "DiT-S/8", "--image-size", "8",
                                  "--resume", "{B}/nope", "--results-dir", "{B}/r2"], "no such checkpoint folder"),
        ("train-resume-not-ckpt", ["train", "--data-path", "digits", "--model", "DiT-S/8", "--image-size", "8",
                                   "--resume", "{B}/empty", "--results-dir", "{B}/r3"],
         "not a complete training checkpoint"),
        ("train-lr-nan", ["train", "--data-path", "digits", "--lr", "nan"], "--lr must be a positive number"),
        ("demo-steps", ["demo", "--steps", "0"], "--steps must be at least 1"),
        ("demo-samples", ["demo", "--num-samples", "3"], "--num-samples must be at least 20"),
        ("sample-missing", ["sample", "--ckpt", "{B}/nope.pt"], "checkpoint not found"),
        ("sample-text-file", ["sample", "--ckpt", "{B}/text.pt"], "cannot read checkpoint"),
        ("sample-pickle-garbage", ["sample", "--ckpt", "{B}/garbage.pt"], "refusing to load|cannot read"),
        ("sample-not-dit", ["sample", "--ckpt", "{B}/not_dit.pt"], "not a DiT checkpoint"),
        ("sample-int-weights", ["sample", "--ckpt", "{B}/int_weights.pt"], "not a DiT checkpoint"),
        ("sample-mismatch", ["sample", "--ckpt", "{T}", "--model", "DiT-B/2", "--device", "cpu"],
         "does not fit DiT-B/2: tensor 'pos_embed' has shape"),
        ("sample-label-high", ["sample", "--ckpt", "{T}", "--class-labels", "10", "--device", "cpu", "--num-steps",
                               "2", "--out", "{B}/s1"], "class label 10 is out of range"),
        ("sample-label-neg", ["sample", "--ckpt", "{T}", "--class-labels", "-1", "--device", "cpu", "--num-steps",
                              "2", "--out", "{B}/s2"], "class label -1 is out of range"),
        ("sample-zero-samples", ["sample", "--ckpt", "{T}", "--num-samples", "0"], "--num-samples must be at least 1"),
        ("sample-eta", ["sample", "--ckpt", "{T}", "--eta", "-0.5"], "--eta must be a finite number >= 0"),
        ("sample-vae-layout", ["sample", "--ckpt", "{T}", "--vae", "{B}/wrong_vae", "--device", "cpu"],
         "cannot load the VAE"),
        ("sample-device", ["sample", "--ckpt", "{T}", "--device", "tpu"], "bad --device"),
        # issue 17 item 9: non-finite and out-of-range numbers, refused before any work
        ("sample-cfg-nan", ["sample", "--ckpt", "{T}", "--out", "{B}/n0",
                           "--cfg-scale", "nan"], "--cfg-scale must be a finite number"),
        ("sample-cfg-inf", ["sample", "--ckpt", "{T}", "--out", "{B}/n1",
                           "--cfg-scale", "inf"], "--cfg-scale must be a finite number"),
        ("sample-interval-nan", ["sample", "--ckpt", "{T}", "--out", "{B}/n2",
                           "--guidance-interval", "nan", "nan"],
         r"--guidance-interval takes two values T_LO <= T_HI of the diffusion timesteps in 0\.\.999"),
        ("sample-interval-beyond", ["sample", "--ckpt", "{T}", "--out", "{B}/n3",
                           "--guidance-interval", "0", "1000"],
         r"--guidance-interval takes two values T_LO <= T_HI of the diffusion timesteps in 0\.\.999"),
        ("sample-interval-negative", ["sample", "--ckpt", "{T}", "--out", "{B}/n4",
                           "--guidance-interval", "-5", "10"],
         r"--guidance-interval takes two values T_LO <= T_HI of the diffusion timesteps in 0\.\.999"),
        ("sample-num-classes-0", ["sample", "--ckpt", "{T}", "--out", "{B}/n5",
                           "--num-classes", "0"], "--num-classes must be at least 1"),
        ("sample-eta-inf", ["sample", "--ckpt", "{T}", "--out", "{B}/n6",
                           "--eta", "inf"], "--eta must be a finite number"),
        ("sample-nan-weights", ["sample", "--ckpt", "{B}/nan_weights.safetensors", "--device", "cpu",
                                "--out", "{B}/n7"],
         "tensor 'blocks.1.mlp.fc1.weight' holds NaN or infinite values"),
        ("sample-inf-weights", ["sample", "--ckpt", "{B}/inf_weights.safetensors", "--device", "cpu",
                                "--out", "{B}/n8"],
         "tensor 'blocks.1.mlp.fc1.weight' holds NaN or infinite values"),
        ("demo-cfg-nan", ["demo", "--cfg-scale", "nan"], "--cfg-scale must be a finite number"),
        ("demo-cfg-inf", ["demo", "--cfg-scale=-inf"], "--cfg-scale must be a finite number"),
        ("train-grad-clip-nan", ["train", "--data-path", "digits", "--grad-clip", "nan"],
         "--grad-clip must be a finite number"),
        ("train-grad-clip-inf", ["train", "--data-path", "digits", "--grad-clip", "inf"],
         "--grad-clip must be a finite number"),
        ("train-num-classes-0", ["train", "--data-path", "digits", "--num-classes", "0"],
         "--num-classes must be at least 1"),
        ("evaluate-missing", ["evaluate", "{B}/nope.npz", "--metric", "digits"], "not found"),
        ("evaluate-float", ["evaluate", "{B}/float.npz", "--metric", "digits"], "arr_0 must be uint8"),
        ("evaluate-no-arr0", ["evaluate", "{B}/no_arr0.npz", "--metric", "digits"], "arr_0"),
        ("evaluate-not-zip", ["evaluate", "{B}/zip_garbage.npz", "--metric", "digits"], "cannot read"),
        ("evaluate-unreadable-images", ["evaluate", "{B}/unreadable", "--metric", "digits"], "cannot read image"),
        ("evaluate-empty", ["evaluate", "{B}/empty", "--metric", "digits"], "no images in"),
        ("evaluate-batch", ["evaluate", "{B}/float.npz", "--batch-size", "0"], "--batch-size must be positive"),
        ("convert-missing", ["convert", "--to", "diffusers", "{B}/nope.pt", "{B}/c1"], "checkpoint not found"),
        ("convert-pickle", ["convert", "--to", "diffusers", "{B}/garbage.pt", "{B}/c2"], "refusing to load|cannot"),
        ("convert-mismatch", ["convert", "--to", "diffusers", "{T}", "{B}/c3", "--model", "DiT-XL/2"],
         "does not fit DiT-XL/2"),
        ("convert-vae-layout", ["convert", "--to", "diffusers", "{T}", "{B}/c4", "--vae", "{B}/wrong_vae"],
         "cannot load an AutoencoderKL"),
        ("convert-not-folder", ["convert", "--to", "ditkit", "{T}", "{B}/c5.safetensors"], "is not a folder"),
        ("convert-wrong-folder", ["convert", "--to", "ditkit", "{B}/wrong_vae", "{B}/c6.safetensors"],
         "not a diffusers DiT folder"),
        ("convert-target", ["convert", "--to", "onnx", "{T}", "{B}/c7"], "invalid choice: 'onnx'"),
        # issue 17 item 11: read-only destinations are named before the work starts
        ("train-readonly", ["train", "--data-path", "digits", "--model", "DiT-S/8", "--image-size", "8",
                            "--results-dir", "{RO}/r"], r"cannot write into .*/r: .*; choose another --results-dir"),
        ("sample-readonly", ["sample", "--ckpt", "{T}", "--device", "cpu", "--num-steps", "2", "--out", "{RO}/s"],
         r"cannot write into .*/s: .*; choose another --out"),
        ("sample-npz-readonly", ["sample", "--ckpt", "{T}", "--device", "cpu", "--num-steps", "2", "--num-samples",
                                 "2", "--out", "{RO}/s"], r"cannot write into .*/s: .*; choose another --out"),
        ("extract-readonly", ["extract", "{B}/unreadable", "--out", "{RO}/e", "--device", "cpu"],
         r"cannot write into .*/e: .*; choose another --out"),
        ("convert-readonly", ["convert", "--to", "diffusers", "{T}", "{RO}/c"],
         r"cannot write into .*ro: .*; choose another DST"),
        # item 12: tracebacks that became one line
        ("sample-out-is-file", ["sample", "--ckpt", "{T}", "--device", "cpu", "--num-steps", "2", "--out", "{T}"],
         "is the input --ckpt .*; choose another --out"),
        ("extract-out-is-file", ["extract", "{B}/unreadable", "--out", "{T}", "--device", "cpu"],
         "it exists and is not a folder; choose another --out"),
        ("sample-seed-huge", ["sample", "--ckpt", "{T}", "--device", "cpu", "--seed", str(2**70)],
         r"--seed must be in 0\.\.4294967295"),
        ("sample-seed-negative", ["sample", "--ckpt", "{T}", "--device", "cpu", "--seed", "-1"],
         r"--seed must be in 0\.\.4294967295"),
        ("train-seed-huge", ["train", "--data-path", "digits", "--global-seed", str(2**70)],
         r"--global-seed must be in 0\.\.4294967295"),
        ("train-classes-huge", ["train", "--data-path", "digits", "--model", "DiT-S/8", "--image-size", "8",
                                "--num-classes", str(10**12), "--results-dir", "{B}/r4"],
         "--num-classes 1000000000000 is more than"),
        ("sample-classes-huge", ["sample", "--ckpt", "{T}", "--device", "cpu", "--num-classes", str(10**12)],
         r"--num-classes must be at least 1 and at most 1,000,000, got 1000000000000"),
        ("sample-stored-classes-huge", ["sample", "--ckpt", "{B}/huge_classes.safetensors", "--device", "cpu"],
         r"huge_classes.safetensors: model config: num_classes must be an integer in 1\.\.1,000,000"),
        ("sample-size-huge", ["sample", "--ckpt", "{T}", "--device", "cpu", "--image-size", str(10**9)],
         r"--image-size must be at least 1 and at most 65536"),
        ("flops-size-huge", ["flops", "--image-size", str(10**9)], "--image-size must be at most 65536"),
        # item 15: messages that named the wrong thing or nothing
        ("evaluate-one-image", ["evaluate", "{B}/one_image", "--metric", "digits"],
         r"one_image holds 1 image; .*at least 2"),
        ("sample-png-as-ckpt", ["sample", "--ckpt", "{B}/picture.png"], "is a PNG image, not a checkpoint"),
        ("sample-pickle-payload", ["sample", "--ckpt", "{B}/payload.pt"],  # the reason whole, not cut mid-sentence
         r"refusing to load .*payload\.pt: it holds a pickled \w+\.system object .*not only tensors; only weight"),
        # item 14: the VAE factor times the patch size, not the patch size alone
        ("train-vae-patch", ["train", "--data-path", "{B}/one_image", "--vae", "{B}/vae8", "--model", "DiT-S/2",
                             "--image-size", "72", "--results-dir", "{B}/r5"],
         r"--image-size 72 is not a multiple of 16 \(VAE factor 8 × patch 2\); use e\.g\. 64 or 80"),
    ]
    if not torch.cuda.is_available():
        cases.append(("sample-no-cuda", ["sample", "--ckpt", "{T}", "--device", "cuda"], "no GPU is visible"))
    if not torch.backends.mps.is_available():
        cases.append(("sample-no-mps", ["sample", "--ckpt", "{T}", "--device", "mps"], "MPS is not available"))
    return cases


def _run(argv: list[str], capsys) -> tuple[int, str]:
    """Exit code and stderr of `ditkit ARGV` run in this process; any other exception fails the test.

    VAE cases run as a real `python -m ditkit` process: diffusers keeps process-wide logging state that an
    in-process capture cannot reproduce faithfully."""
    if "--vae" in argv:
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, "-m", "ditkit", *argv], env=env, capture_output=True, text=True)
        return done.returncode, done.stderr
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse
        code = exit_.code
    return code, capsys.readouterr().err


def _assert_one_clear_line(verb: str, code: int, err: str) -> str:
    assert code == 2, (code, err[-1000:])
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("ditkit")]
    assert len(lines) == 1 and lines[0].startswith(f"ditkit {verb}: error: "), err[-1000:]
    return lines[0]


@pytest.mark.parametrize("case", _cases(), ids=[c[0] for c in _cases()])
def test_bad_input_gives_one_line_and_exit_2(files, capsys, case, tmp_path, monkeypatch):
    _, argv, pattern = case
    monkeypatch.chdir(tmp_path)  # verbs with a default output folder (sample's ./samples) write here, not the checkout
    if any("{RO}" in a for a in argv):
        if files["readonly"] is None:
            pytest.skip("no read-only folder can be made here (root without mount)")
        argv = [a.replace("{RO}", str(files["readonly"])) for a in argv]
    argv = [a.replace("{B}", str(files["base"])).replace("{T}", str(files["tiny"])) for a in argv]
    code, err = _run(argv, capsys)
    line = _assert_one_clear_line(argv[0], code, err)
    assert re.search(pattern, line), line


# ----------------------------------------------------------------------------------------------- hypothesis

INT_TEXT = st.one_of(st.integers(-3, 3).map(str), st.sampled_from(["x", "1.5", "", "-0", "nan"]))
FLOAT_TEXT = st.one_of(st.floats(-2, 6).map(str), st.sampled_from(["x", "inf", "-inf", "nan", ""]))


@st.composite
def sample_argv(draw) -> list[str]:
    """Combinations of `ditkit sample` options around the tiny checkpoint: few steps and samples, so even a
    valid combination runs in well under a second."""
    argv = ["sample", "--ckpt", "{T}", "--device", "cpu", "--no-progress", "--out", "{B}/hyp"]
    options = {
        "--num-steps": INT_TEXT, "--batch-size": INT_TEXT, "--per-label": INT_TEXT, "--num-samples": INT_TEXT,
        "--image-size": st.sampled_from(["8", "16", "0", "-8", "7"]), "--cfg-scale": FLOAT_TEXT,
        "--eta": FLOAT_TEXT, "--sampler": st.sampled_from(["ddpm", "ddim", "dpm-solver", "euler"]),
        "--num-classes": st.sampled_from(["10", "0", "5", "-1"]), "--model": st.sampled_from(["DiT-S/2", "DiT-S/4"]),
        "--precision": st.sampled_from(["fp32", "bf16", "fp8"]), "--guide-channels": st.sampled_from(["3", "all", "2"]),
    }
    for flag in draw(st.lists(st.sampled_from(sorted(options)), max_size=5, unique=True)):
        argv += [flag, draw(options[flag])]
    if draw(st.booleans()):
        argv += ["--class-labels", *map(str, draw(st.lists(st.integers(-2, 12), min_size=1, max_size=3)))]
    if draw(st.booleans()):
        argv += ["--guidance-interval", draw(FLOAT_TEXT), draw(FLOAT_TEXT)]
    if "--num-steps" not in argv:
        argv += ["--num-steps", "2"]  # the defaults (250 DDPM steps) are valid but slow
    return argv


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=sample_argv())
def test_hypothesis_sample_arguments_never_traceback(files, capsys, argv):
    argv = [a.replace("{B}", str(files["base"])).replace("{T}", str(files["tiny"])) for a in argv]
    code, err = _run(argv, capsys)
    assert code in (0, 2), (argv, code, err[-1000:])
    assert "Traceback" not in err
    if code == 2:
        _assert_one_clear_line("sample", code, err)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=INT_TEXT.map(lambda s: s + "0" if s.lstrip("-").isdigit() else s),
       model=st.sampled_from([None, "DiT-S/8", "DiT-XL/2", "DiT-S/3"]), extra=st.sampled_from([[], ["--json"],
                                                                                               ["--pixel-space"]]))
def test_hypothesis_flops_arguments_never_traceback(capsys, size, model, extra):
    argv = ["flops", "--image-size", size, *(["--model", model] if model else []), *extra]
    code, err = _run(argv, capsys)
    assert code in (0, 2) and "Traceback" not in err, (argv, code, err[-1000:])
    if code == 2:
        _assert_one_clear_line("flops", code, err)
