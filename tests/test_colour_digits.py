"""The captioned colour digits: painting, reading back, captions, and the held-out combinations."""

from __future__ import annotations

import torch

from ditkit.data import colour_digits as cd


def test_captions_tokens_and_held_out_pairs():
    assert cd.caption(7, 0, 2) == "a red seven on a blue background"
    train, held = cd.combinations(False), cd.combinations(True)
    assert not set(train) & set(held) and len(train) + len(held) == 10 * 6 * 5
    assert {(d, f) for d, f, _ in held} == set(cd.HELD_OUT) and all(f != b for _, f, b in train + held)
    # Every digit and every colour is still seen in training, only not together.
    assert {d for d, _, _ in train} == set(range(10)) and {f for _, f, _ in train} == set(range(6))
    ids, mask = cd.tokenize(["a red seven on a blue background", "a red seven"])
    assert ids.shape == (2, cd.MAX_WORDS) and mask.sum(1).tolist() == [7, 3]
    assert cd.VOCAB[ids[0, 2]] == "seven" and ids[1, 3:].eq(0).all()


def test_reading_an_image_back_recovers_colours_and_ink_exactly():
    data = cd.ColourDigits("test", held_out=True)
    images, captions, combos = data.batch(300, torch.Generator().manual_seed(0))
    assert all((d, f) in cd.HELD_OUT for d, f, _ in combos.tolist())
    assert captions[0] == cd.caption(*combos[0].tolist())
    fg, bg, ink = cd.read_image(images)
    assert torch.equal(fg, combos[:, 1]) and torch.equal(bg, combos[:, 2])
    assert images.shape == (300, 3, 8, 8) and images.min() >= -1 and images.max() <= 1
    # The painted ink is bg + ink·(fg − bg): projecting back gives the digit as the classifier saw it.
    real = torch.stack([data.ink[data.labels == d][0] for d in range(10)])
    painted = cd.paint(real, torch.arange(10) % 6, (torch.arange(10) + 1) % 6)
    torch.testing.assert_close(cd.read_image(painted)[2], real * 2 - 1, rtol=0, atol=1e-6)
    # Noise of a sampler's size does not change what is read.
    noisy = (images + 0.1 * torch.randn(images.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    fg2, bg2, _ = cd.read_image(noisy)
    assert (fg2 == combos[:, 1]).float().mean() > 0.99 and (bg2 == combos[:, 2]).float().mean() > 0.99
