"""`ditkit demo --text` end to end on a few steps: it trains, reuses the training, writes the grid and figures."""

from __future__ import annotations

import json
import subprocess
import sys

from PIL import Image


def test_text_demo_runs_end_to_end_and_reuses_training(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "ditkit", "demo", "--text", "--results-dir", str(out), "--steps", "3",
           "--num-samples", "20", "--json"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    figures = json.loads(first.stdout.strip().splitlines()[-1])
    for part in ("trained_combinations", "held_out_combinations"):
        assert set(figures[part]) == {"digit", "foreground", "background", "colour", "all"}
        assert all(0.0 <= v <= 1.0 for v in figures[part].values())
    assert "held out combinations: digit" in first.stdout and not figures["reused_training"]
    grid = Image.open(out / "grid.png")
    assert grid.size[1] == 20 * 32  # one row per prompt: each digit in its held-out colour and in another
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and json.loads(again.stdout.strip().splitlines()[-1])["reused_training"]


def test_text_demo_bad_arguments_exit_2(tmp_path):
    cmd = [sys.executable, "-m", "ditkit", "demo", "--text", "--results-dir", str(tmp_path / "d"), "--steps", "0"]
    bad = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--steps" in bad.stderr


def test_score_reads_real_painted_digits_as_the_classifier_reads_grey_ones():
    # The independent reference: the digits classifier's accuracy on the held-out grey digits themselves. Painting
    # them in colours and scoring through read_image must give the same digit accuracy and every colour right;
    # scoring against the wrong digits (labels shifted by one) must fall to about nothing.
    import torch

    from ditkit.apps import demo_text
    from ditkit.data import colour_digits as cd
    from ditkit.data.digits import load_digits_split
    from ditkit.metrics.digits_classifier import accuracy, get_digits_classifier

    grey, labels = load_digits_split(8, "test")
    reference = accuracy(get_digits_classifier(8, verbose=False), grey, labels)
    for held_out in (False, True):
        data = cd.ColourDigits("test", held_out=held_out)
        combos = data.combos[torch.arange(len(labels)) % len(data.combos)]
        painted = cd.paint(data.ink, combos[:, 1], combos[:, 2])
        truth = torch.stack([labels, combos[:, 1], combos[:, 2]], dim=1)
        figures = demo_text.score(painted, truth)
        assert abs(figures["digit"] - reference) <= 0.01 and reference > 0.95
        assert figures["foreground"] == figures["background"] == figures["colour"] == 1.0
        wrong = truth.clone()
        wrong[:, 0] = (labels + 1) % 10
        assert demo_text.score(painted, wrong)["digit"] < 0.05


def test_word_encoder_spreads_each_word_over_every_token():
    # The demo's encoder must contextualise (as T5/CLIP do): changing the digit word changes every output token,
    # not only its own; a bag of words (the encoder without its self-attention layer) changes one.
    import torch

    from ditkit.apps.demo_text import WordEncoder
    from ditkit.data import colour_digits as cd

    torch.manual_seed(0)
    encoder = WordEncoder(len(cd.VOCAB), cd.MAX_WORDS, 64).eval()
    ids, _ = cd.tokenize([cd.caption(7, 0, 2), cd.caption(3, 0, 2)])  # only word 2 (the digit) differs
    with torch.no_grad():
        out = encoder(ids)
        bag = encoder.words(ids) + encoder.positions
    moved = (out[0] - out[1]).norm(dim=1)
    assert out.shape == (2, cd.MAX_WORDS, 64) and bool((moved > 1e-3).all())
    assert (bag[0] - bag[1]).norm(dim=1).gt(1e-6).tolist() == [i == 2 for i in range(cd.MAX_WORDS)]
