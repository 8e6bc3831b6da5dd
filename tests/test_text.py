"""Captions read in each layout, and the frozen text encoders on tiny random T5/CLIP models built here."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from ditkit.data.captions import read_captions
from ditkit.runtime.errors import UserError
from helpers.text import save_clip, save_t5, tiny_tokenizer


def images(root, names):
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), "red").save(path)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- captions


def test_sidecar_captions_are_read_and_joined_into_one_line(tmp_path):
    paths = images(tmp_path, ["a.png", "sub/b.jpg"])
    (tmp_path / "a.txt").write_text("a red seven\n")
    (tmp_path / "sub" / "b.txt").write_text("  a blue\n cube ")
    assert read_captions(tmp_path, paths) == ["a red seven", "a blue cube"]


@pytest.mark.parametrize("table", ["metadata.jsonl", "captions.jsonl", "metadata.csv"])
def test_hugging_face_tables_are_read(tmp_path, table):
    paths = images(tmp_path, ["x.png", "d/y.png"])
    (tmp_path / "x.txt").write_text("ignored: the table wins")
    rows = [{"file_name": "x.png", "text": "a red cube"}, {"file_name": "d/y.png", "text": "blue, \"quoted\""}]
    if table.endswith(".csv"):
        lines = ["file_name,text"] + [f'{r["file_name"]},"{r["text"].replace(chr(34), chr(34) * 2)}"' for r in rows]
        (tmp_path / table).write_text("\n".join(lines) + "\n")
    else:
        (tmp_path / table).write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert read_captions(tmp_path, paths) == ["a red cube", 'blue, "quoted"']


def test_caption_column_may_be_named_caption_or_prompt(tmp_path):
    paths = images(tmp_path, ["x.png"])
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "x.png", "prompt": "a cube"}) + "\n")
    assert read_captions(tmp_path, paths) == ["a cube"]


def test_missing_and_empty_captions_name_the_file(tmp_path):
    paths = images(tmp_path / "side", ["a.png", "b.png"])
    (tmp_path / "side" / "a.txt").write_text("a cube")
    with pytest.raises(UserError, match=r"b\.png: no caption; write it to b\.txt"):
        read_captions(tmp_path / "side", paths)
    (tmp_path / "side" / "b.txt").write_text(" \n ")
    with pytest.raises(UserError, match=r"b\.png: its caption in .*b\.txt is empty"):
        read_captions(tmp_path / "side", paths)
    paths = images(tmp_path / "tab", ["a.png", "b.png"])
    (tmp_path / "tab" / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "x"}) + "\n")
    with pytest.raises(UserError, match=r"b\.png: no caption in .*metadata\.jsonl"):
        read_captions(tmp_path / "tab", paths)
    (tmp_path / "tab" / "metadata.jsonl").write_text(
        json.dumps({"file_name": "a.png", "text": "x"}) + "\n" + json.dumps({"file_name": "b.png", "text": ""}))
    with pytest.raises(UserError, match=r"b\.png: its caption in .*metadata\.jsonl is empty"):
        read_captions(tmp_path / "tab", paths)
    (tmp_path / "tab" / "metadata.jsonl").write_text("{not json\n")
    with pytest.raises(UserError, match="line 1 is not a JSON object"):
        read_captions(tmp_path / "tab", paths)


# --------------------------------------------------------------------------- text encoders


def test_t5_encoder_masks_padding_and_its_features_do_not_depend_on_it(tmp_path):
    from ditkit.encoders.text import load_text_encoder

    save_t5(tmp_path / "t5")
    short = load_text_encoder(str(tmp_path / "t5"), max_tokens=8)
    long = load_text_encoder(str(tmp_path / "t5"), max_tokens=12)
    assert short.kind == "t5" and short.channels == 16
    assert not any(p.requires_grad for p in short.model.parameters())
    feats, mask = short.encode(["a red seven", "a blue cube on a red background"])
    assert feats.shape == (2, 8, 16) and feats.dtype == torch.float32
    assert mask.sum(1).tolist() == [4, 8]  # words + </s>
    feats12, mask12 = long.encode(["a red seven"])
    assert mask12.sum().item() == 4
    torch.testing.assert_close(feats12[0, :4], feats[0, :4], rtol=0, atol=1e-5)


def test_clip_text_encoder_and_a_pipeline_folder_layout(tmp_path):
    from ditkit.encoders.text import load_text_encoder

    save_clip(tmp_path / "pipe" / "text_encoder")
    tiny_tokenizer(bos=True).save_pretrained(str(tmp_path / "pipe" / "tokenizer"))
    enc = load_text_encoder(str(tmp_path / "pipe"), max_tokens=10)
    assert enc.kind == "clip" and enc.channels == 16
    feats, mask = enc.encode(["a red cube"])
    assert feats.shape == (1, 10, 16) and mask.sum().item() == 5  # <s> a red cube </s>
    assert load_text_encoder(str(tmp_path / "pipe")).max_tokens == 77  # CLIP's default


def test_missing_encoder_is_one_line(tmp_path):
    from ditkit.encoders.text import load_text_encoder

    with pytest.raises(UserError, match="not in the Hugging Face cache") as err:
        load_text_encoder("nobody/no-such-t5-here")
    assert "\n" not in str(err.value) and "huggingface-cli download nobody/no-such-t5-here" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no loadable"):
        load_text_encoder(str(tmp_path / "empty"))


# --------------------------------------------------------------------------- captions encoded beside latents


def test_extract_encodes_captions_beside_the_latents_row_for_row(tmp_path):
    import subprocess
    import sys

    from ditkit.data.caption_store import StoredCaptions
    from ditkit.data.store import LatentStore
    from ditkit.encoders.text import load_text_encoder
    from helpers.vae import make_tiny_vae

    folder = tmp_path / "imgs"
    words = ["a red cube", "a blue seven", "red on blue", "a cube on a red background", "seven"]
    folder.mkdir()
    for i, text in enumerate(words):
        Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(text)
    vae = make_tiny_vae(tmp_path / "vae")
    save_t5(tmp_path / "t5")
    cmd = [sys.executable, "-m", "ditkit", "extract", str(folder), "--out", str(tmp_path / "store"), "--vae",
           str(vae), "--image-size", "16", "--shard-size", "2", "--batch-size", "2", "--workers", "0",
           "--device", "cpu", "--no-progress", "--text-encoder", str(tmp_path / "t5"), "--max-tokens", "6"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    store = LatentStore(tmp_path / "store")
    stored = StoredCaptions(tmp_path / "store")
    assert len(store) == 5 and stored.info["max_tokens"] == 6 and stored.info["channels"] == 16
    feats, mask = stored.batch([4, 0, 2])
    expected, expected_mask = load_text_encoder(str(tmp_path / "t5"), max_tokens=6).encode(
        [words[4], words[0], words[2]])
    assert torch.equal(mask, expected_mask)
    torch.testing.assert_close(feats, expected, rtol=1e-3, atol=1e-3)  # stored as float16
    # A missing caption is named before any image is encoded.
    (folder / "3.txt").unlink()
    bad = subprocess.run([*cmd[:6], str(tmp_path / "store2"), *cmd[7:]], capture_output=True, text=True)
    assert bad.returncode == 2 and "3.png: no caption" in bad.stderr
    assert not (tmp_path / "store2" / "manifest.json").exists()


def test_a_captioned_store_trains_a_text_model_that_samples_from_prompts(tmp_path):
    """extract --text-encoder → train (text model, stored captions) → sample --prompt, end to end."""
    import subprocess
    import sys

    import ditkit
    from ditkit.train import TrainOptions, train
    from helpers.vae import make_tiny_vae

    folder = tmp_path / "imgs"
    folder.mkdir()
    words = ["a red cube", "a blue seven", "red on blue", "a cube on a red background"] * 2
    for i in range(len(words)):
        Image.new("RGB", (16, 16), (30 * i, 0, 255 - 30 * i)).save(folder / f"{i}.png")
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps({"file_name": f"{i}.png", "text": t})
                                                     for i, t in enumerate(words)) + "\n")
    vae = make_tiny_vae(tmp_path / "vae")
    save_t5(tmp_path / "t5")
    env_cmd = [sys.executable, "-m", "ditkit"]
    subprocess.run([*env_cmd, "extract", str(folder), "--out", str(tmp_path / "store"), "--vae", str(vae),
                    "--image-size", "32", "--workers", "0", "--device", "cpu", "--no-progress",
                    "--text-encoder", str(tmp_path / "t5"), "--max-tokens", "6"], check=True, capture_output=True)
    result = train(TrainOptions(data_path=str(tmp_path / "store"), model="DiT-S/2", global_batch_size=4,
                                max_steps=3, ckpt_every=3, log_every=1, num_workers=0, progress=False,
                                results_dir=str(tmp_path / "run"), lr=1e-3,
                                model_overrides={"depth": 1, "hidden_size": 32, "num_heads": 2}))
    assert result.ema.config.is_text and result.ema.config.caption_channels == 16
    ckpt = next((tmp_path / "run" / "checkpoints").iterdir())
    assert ditkit.load_model(ckpt).config.max_tokens == 6
    out = subprocess.run([*env_cmd, "sample", "--ckpt", str(ckpt), "--vae", str(vae), "--text-encoder",
                          str(tmp_path / "t5"), "--prompt", "a red cube", "--sampler", "ddim", "--num-steps", "3",
                          "--per-label", "2", "--out", str(tmp_path / "samples"), "--no-progress"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "samples" / "grid.png").is_file()
