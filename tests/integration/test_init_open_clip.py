"""``model.init_from=open_clip:``. In open_clip's own environment (marker open_clip), an open_clip
CLIP at random weights, built from the model config of our towers and saved by open_clip itself
(``save_for_hf``: ``open_clip_config.json``, ``open_clip_model.safetensors`` and
``open_clip_pytorch_model.bin``); here, our towers started from the folder, from the ``.bin``
alone and from the SigLIP variant give its features (within 1e-5) and its logit scale and bias;
a vision run takes its image encoder and LiT starts from it; a checkpoint of other shapes is one
line and exit 2 from the CLI. Without open_clip: a ``.bin`` whose pickle would run code is
refused and never runs; a folder without the config, and an OpenAI-tokenizer model (argmax
pooling), are one line each."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from dist_contrast.config import load_config
from dist_contrast.methods import build_method, init
from dist_contrast.methods.init import InitError

from conftest import needs_open_clip, run_cli, run_open_clip

# In open_clip's environment: argv = model_cfg json, tokenizer dir, out dir, inputs .pt
OPEN_CLIP_SAVES = r"""
import json, sys

import torch
from open_clip.model import CLIP
from open_clip.push_to_hf_hub import save_for_hf
from open_clip.tokenizer import HFTokenizer

model_cfg, tok_dir, out, inputs = sys.argv[1:]
model_cfg = json.loads(model_cfg)
torch.manual_seed(0)
model = CLIP(**model_cfg).eval()
model.visual.image_mean = model.visual.image_std = (0.5, 0.5, 0.5)  # as create_model sets them
with torch.no_grad():  # away from the init's constants (a zero bias, a unit LayerNorm)
    for p in model.parameters():
        p.add_(0.02 * torch.randn_like(p))
tokenizer = HFTokenizer(tok_dir, context_length=model_cfg["text_cfg"]["context_length"])
save_for_hf(model, tokenizer, model_cfg, out)
x = torch.load(inputs, weights_only=True)
bias = model.logit_bias if model.logit_bias is not None else torch.tensor(0.0)  # CLIP: none
with torch.no_grad():
    torch.save(
        {
            "image": model.encode_image(x["image"]),
            "text": model.encode_text(x["tokens"]),
            "logit_scale": model.logit_scale.detach(),
            "logit_bias": bias.detach(),
        },
        f"{out}/features.pt",
    )
"""


def _cfg(tokenizer, *extra):
    return load_config(
        "configs/clip_vit_digits.yaml",
        [
            f"data.tokenizer_path={tokenizer}",
            "data.channels=3",
            "data.mean=[0.5,0.5,0.5]",
            "data.std=[0.5,0.5,0.5]",
            *extra,
        ],
    )


def _saved_by_open_clip(cfg, tmp_path):
    from dist_contrast.data.tokenizer import tokenizer_for
    from dist_contrast.export.hf import write_tokenizer
    from dist_contrast.export.open_clip import model_config

    tok = tokenizer_for(cfg.data)
    tok_dir = tmp_path / "tokenizer"
    tok_dir.mkdir()
    write_tokenizer(tok, tok_dir)
    model_cfg = model_config(cfg, tok.vocab_size, tok.eot_id, tok.pad_id, str(tok_dir))
    image = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    tokens = tok(["a sketch of a seven", "the digit 0", "a low resolution three"])
    torch.save({"image": image, "tokens": tokens}, tmp_path / "inputs.pt")
    out = tmp_path / "open_clip"
    args = [json.dumps(model_cfg), str(tok_dir), str(out), str(tmp_path / "inputs.pt")]
    run_open_clip("-c", OPEN_CLIP_SAVES, *args)
    return out, image, tokens, torch.load(out / "features.pt", weights_only=True)


@pytest.mark.open_clip
@needs_open_clip
@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_our_towers_from_open_clip_give_its_features(loss, digits_dir, digits_tokenizer, tmp_path):
    from dataclasses import replace

    cfg = _cfg(digits_tokenizer, f"loss.name={loss}")
    folder, image, tokens, theirs = _saved_by_open_clip(cfg, tmp_path)
    assert {p.name for p in folder.iterdir()} >= {
        "open_clip_config.json",
        "open_clip_model.safetensors",
        "open_clip_pytorch_model.bin",
    }
    for source in (folder, f"local-dir:{folder}", folder / "open_clip_pytorch_model.bin"):
        run_cfg = replace(cfg, model=replace(cfg.model, init_from=f"open_clip:{source}"))
        torch.manual_seed(123)  # other weights than open_clip's, until loaded
        method = build_method(run_cfg)
        line = init.apply(method, run_cfg)
        assert line.startswith("started from open_clip:") and "text encoder, heads" in line
        method.eval()
        with torch.no_grad():
            ours = {"image": method.image(image), "text": method.text(tokens)}
        for kind in ("image", "text"):
            assert (ours[kind] - theirs[kind]).abs().max().item() <= 1e-5, (source, kind)
        scale = method.criterion.logit_scale
        assert scale.item() == pytest.approx(theirs["logit_scale"].item(), rel=1e-6)
        if loss == "siglip":
            assert method.criterion.logit_bias.item() == theirs["logit_bias"].item()
    # a vision run (SimCLR, the same ViT) takes the image encoder alone
    vision = load_config(
        "configs/simclr_digits.yaml",
        [
            "model.encoder=vit_nano",
            "model.vit_layout=clip",
            "model.patch_size=4",
            "data.channels=3",
            "data.mean=[0.5,0.5,0.5]",
            "data.std=[0.5,0.5,0.5]",
            f"model.init_from=open_clip:{folder}",
        ],
    )
    simclr = build_method(vision)
    assert init.apply(simclr, vision).endswith("image encoder")
    encoder = simclr.towers()["image"].state_dict()
    assert encoder.keys() == method.image.encoder.state_dict().keys()
    for key, value in method.image.encoder.state_dict().items():
        assert torch.equal(encoder[key], value), key
    # LiT from it: the image tower loaded and frozen, the text tower loaded and trained
    lit = replace(cfg, model=replace(cfg.model, init_from=f"open_clip:{folder}", lock_image=True))
    method = build_method(lit)
    init.apply(method, lit)
    assert not any(p.requires_grad for p in method.image.parameters())
    assert all(p.requires_grad for p in method.text.parameters())
    with torch.no_grad():
        assert (method.image(image) - theirs["image"]).abs().max().item() <= 1e-5
    # a checkpoint of other shapes (a wider ViT here): one line, exit 2
    proc = run_cli(
        "train",
        "--config",
        "configs/clip_vit_digits.yaml",
        f"data.tokenizer_path={digits_tokenizer}",
        "data.channels=3",
        "data.mean=[0.5,0.5,0.5]",
        "data.std=[0.5,0.5,0.5]",
        f"loss.name={loss}",
        "model.vit_width=64",
        f"model.init_from=open_clip:{folder}",
        f"run.dir={tmp_path / 'runs'}",
        f"data.train_shards={digits_dir}/train-*.tar",
        "data.val_shards=",
        "data.num_workers=0",
        "train.steps=1",
        "deepspeed.zero_stage=0",
        "logging.wandb=false",
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "model.init_from" in lines[0] and "shape" in lines[0], lines


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_bin_whose_pickle_would_run_code_is_refused(digits_tokenizer, tmp_path):
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": {}}))
    marker = tmp_path / "ran"
    with open(folder / "open_clip_pytorch_model.bin", "wb") as f:
        pickle.dump({"visual.proj": _Payload(marker)}, f)
    from dataclasses import replace

    cfg = _cfg(digits_tokenizer)
    for source in (folder, folder / "open_clip_pytorch_model.bin"):
        run_cfg = replace(cfg, model=replace(cfg.model, init_from=f"open_clip:{source}"))
        with pytest.raises(InitError, match="weights_only=True.*nothing in it was run"):
            init.apply(build_method(run_cfg), run_cfg)
    assert not marker.exists()
    (folder / "open_clip_config.json").unlink()
    run_cfg = replace(cfg, model=replace(cfg.model, init_from=f"open_clip:{folder}"))
    with pytest.raises(InitError, match="has no open_clip_config.json"):
        init.apply(build_method(run_cfg), run_cfg)
    # an OpenAI-tokenizer model (argmax pooling): refused before any tensor is mapped
    from safetensors.torch import save_file

    openai = tmp_path / "openai"
    openai.mkdir()
    save_file({"logit_scale": torch.tensor(1.0)}, str(openai / "open_clip_model.safetensors"))
    eps = {"eps": 1e-6}  # the run's; open_clip's default is 1e-5
    text_cfg = {"width": 64, "heads": 4, "pool_type": "argmax", "norm_kwargs": eps}
    vision_cfg = {"width": 128, "head_width": 32, "norm_kwargs": eps}
    doc = {"model_cfg": {"text_cfg": text_cfg, "vision_cfg": vision_cfg}}
    (openai / "open_clip_config.json").write_text(json.dumps(doc))
    run_cfg = replace(cfg, model=replace(cfg.model, init_from=f"open_clip:{openai}"))
    with pytest.raises(InitError, match="pools by 'argmax'"):
        init.apply(build_method(run_cfg), run_cfg)
