"""build_from_parts: an Ovis assembled from HF SigLIP/SigLIP2 + Qwen3 checkpoints written by transformers.

Also the Qwen3 reference-parity tests: our LLM against transformers' Qwen3ForCausalLM on the same weights,
logits and (packed training) gradients.
"""
import copy
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from ovis25 import Ovis, build_from_parts
from ovis25.build import VISION_PREFIX
from ovis25.checkpoint import CheckpointError
from ovis25.config import ConfigError
from ovis25.model.llm import AttnContext
from ovis25.model.vision import VisionLayout

transformers = pytest.importorskip("transformers")
from transformers import (Qwen3Config as HFQwen3Config, Qwen3ForCausalLM as HFQwen3,  # noqa: E402
                          SiglipConfig, SiglipModel, SiglipVisionConfig, SiglipVisionModel)

PATCH = 16
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=PATCH)
GRID = 4  # learned position grid side: image_size = GRID * PATCH, NaFlex num_patches = GRID**2
QWEN = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 5e5})
VOCAB = 24  # visual vocabulary of the built model (20 head outputs + 4 indicators)
VISION_KINDS = ["siglip_vision", "siglip_full"] + (["siglip2_naflex", "siglip2_full"]
                                                   if hasattr(transformers, "Siglip2VisionModel") else [])
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=50,
            bos_token_id=0, eos_token_id=1, pad_token_id=1)


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial weights: no norm scale at 1, no zero bias, O(1) activations."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1:
                p.copy_(1 + 0.1 * noise if name.endswith("weight") else 0.02 * noise)
            else:
                p.copy_(noise / math.sqrt(p[0].numel()))


def make_vision(root, kind: str):
    """Save a random HF vision checkpoint; returns (dir, model)."""
    # full models (SiglipModel / Siglip2Model): the text tower and logit scale/bias must be skipped
    if kind == "siglip2_naflex":
        model = transformers.Siglip2VisionModel(transformers.Siglip2VisionConfig(**VISION, num_patches=GRID ** 2))
    elif kind == "siglip2_full":
        model = transformers.Siglip2Model(transformers.Siglip2Config(
            vision_config=dict(VISION, num_patches=GRID ** 2), text_config=TEXT))
    elif kind == "siglip_vision":
        model = SiglipVisionModel(SiglipVisionConfig(**VISION, image_size=GRID * PATCH))
    else:
        model = SiglipModel(SiglipConfig(vision_config=dict(VISION, image_size=GRID * PATCH), text_config=TEXT))
    randomize(model, 1)
    path = root / kind
    model.save_pretrained(path)
    return path, model.eval()


def make_qwen3(root, tied: bool, shard: bool = False, **overrides):
    model = HFQwen3(HFQwen3Config(**{**QWEN, **overrides}, tie_word_embeddings=tied))
    randomize(model, 2)
    path = root / f"qwen3-{'tied' if tied else 'untied'}{'-sharded' if shard else ''}"
    model.save_pretrained(path, max_shard_size="20KB" if shard else "5GB")
    return path, model.eval()


def vision_tower(model):
    return getattr(model, "vision_model", model)  # transformers 5 vision-only models have no wrapper


def vision_state(model) -> dict[str, torch.Tensor]:
    """The HF vision tower's tensors under their Ovis names (pooling head dropped)."""
    return {VISION_PREFIX + k: v for k, v in vision_tower(model).state_dict().items() if not k.startswith("head.")}


def patch_rows(image: torch.Tensor, stride: int = 2) -> torch.Tensor:
    """(C, H, W) -> our pixel rows: 2x2 groups row-major, patches inside a group, channel-major rows."""
    c, height, width = image.shape
    h, w = height // PATCH, width // PATCH
    x = image.view(c, h // stride, stride, PATCH, w // stride, stride, PATCH)
    return x.permute(1, 4, 2, 5, 0, 3, 6).reshape(h * w, c * PATCH * PATCH)


def naflex_patches(image: torch.Tensor) -> torch.Tensor:
    """HF's own NaFlex patchifier, so the test checks HF's (p, p, C) row order rather than our reading of it."""
    try:
        from transformers.models.siglip2.image_processing_pil_siglip2 import convert_image_to_patches
        return torch.from_numpy(convert_image_to_patches(image.numpy(), PATCH))
    except ImportError:  # older transformers: one torch/numpy module
        from transformers.models.siglip2.image_processing_siglip2 import convert_image_to_patches
        return torch.as_tensor(convert_image_to_patches(image, PATCH))


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    out = {kind: make_vision(root, kind) for kind in VISION_KINDS}
    out["tied"] = make_qwen3(root, tied=True, shard=True)
    out["untied"] = make_qwen3(root, tied=False, attention_bias=True)
    return out


@pytest.mark.parametrize("kind", VISION_KINDS)
@pytest.mark.parametrize("llm", ["tied", "untied"])
def test_copied_tensors_equal_source(parts, kind, llm):
    (vdir, vmodel), (ldir, lmodel) = parts[kind], parts[llm]
    model = build_from_parts(vdir, ldir, visual_vocab_size=VOCAB)
    ours = model.state_dict()
    expected = vision_state(vmodel) | {"llm." + k: v for k, v in lmodel.state_dict().items()}
    patch = VISION_PREFIX + "embeddings.patch_embedding.weight"
    if kind.startswith("siglip2"):  # Linear over (p, p, C) rows -> Conv2d (D, C, p, p)
        d = expected[patch].shape[0]
        expected[patch] = expected[patch].view(d, PATCH, PATCH, 3).permute(0, 3, 1, 2)
    for name, t in expected.items():
        assert torch.equal(ours[name], t), name
    assert set(ours) - set(expected) == {"visual_tokenizer.head.0.weight", "visual_tokenizer.head.1.weight",
                                         "visual_tokenizer.head.1.bias", "vte.weight"}
    assert (model.llm.lm_head.weight is model.llm.model.embed_tokens.weight) == (llm == "tied")
    c = model.config
    assert (c.vit_config.hidden_size, c.vit_config.image_size, c.vit_config.model_type) == (32, GRID * PATCH,
                                                                                             "siglip2_navit")
    assert c.llm_config.rope_theta == 5e5 and c.llm_config.extra["initializer_range"] == 0.02  # unknowns kept
    assert c.visual_vocab_size == VOCAB


def test_dtype_and_new_parts(parts):
    torch.manual_seed(0)
    model = build_from_parts(parts["siglip_vision"][0], parts["tied"][0], visual_vocab_size=VOCAB,
                             vet_init_std=0.5, dtype=torch.bfloat16)
    source = parts["tied"][1].state_dict()["model.embed_tokens.weight"]
    assert torch.equal(model.llm.model.embed_tokens.weight, source.to(torch.bfloat16))
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert abs(model.vte.weight.float().std().item() - 0.5) < 0.05
    head_norm = model.visual_tokenizer.head[1]
    assert torch.equal(head_norm.weight, torch.ones_like(head_norm.weight)) and not head_norm.bias.any()


@pytest.mark.parametrize("llm", ["tied", "untied"])
def test_qwen3_logits_match_transformers(parts, llm):
    ldir, hf = parts[llm]
    model = build_from_parts(parts["siglip_vision"][0], ldir, visual_vocab_size=VOCAB)
    ids = torch.randint(0, QWEN["vocab_size"], (2, 19), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours, ref = model(ids).logits, hf(input_ids=ids).logits
    assert ref.abs().max() > 1  # the comparison is not between near-zero numbers
    assert (ours - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("llm", ["tied", "untied"])
def test_qwen3_gradients_match_transformers(parts, llm):
    """Training parity: two sequences packed into one row (our varlen path, positions restarting) give the same
    loss and parameter gradients as transformers' Qwen3 run on each sequence alone."""
    ldir, hf = parts[llm]
    hf = copy.deepcopy(hf).train()
    ours = build_from_parts(parts["siglip_vision"][0], ldir, visual_vocab_size=VOCAB).llm.train()
    g = torch.Generator().manual_seed(4)
    seqs = [torch.randint(0, QWEN["vocab_size"], (n,), generator=g) for n in (13, 7)]

    def loss_of(logits, ids):  # next-token loss summed over the sequence
        return torch.nn.functional.cross_entropy(logits[:-1], ids[1:], reduction="sum")

    ids = torch.cat(seqs)
    positions = torch.cat([torch.arange(len(s)) for s in seqs])[None]
    ctx = AttnContext(cu_seqlens=torch.tensor([0, 13, 20]))
    logits = ours.lm_head(ours(ours.model.embed_tokens(ids[None]), positions, ctx))[0]
    ours_loss = loss_of(logits[:13], seqs[0]) + loss_of(logits[13:], seqs[1])
    ours_loss.backward()
    ref_loss = sum(loss_of(hf(input_ids=s[None]).logits[0], s) for s in seqs)
    ref_loss.backward()
    assert ours_loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    ref_grads = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        ref = ref_grads[name].grad
        assert ref.abs().max() > 0, name  # every weight gets a gradient: the comparison is not of zeros
        torch.testing.assert_close(p.grad, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item(), msg=name)


def test_transformers4_qwen3_config_layout(parts, tmp_path):
    """Older config.json: top-level rope_theta, no rope_parameters, tie_word_embeddings left to its default."""
    ldir, hf = parts["untied"]
    shutil.copytree(ldir, tmp_path / "v4")
    config = json.loads((ldir / "config.json").read_text())
    rope = config.pop("rope_parameters")
    del config["tie_word_embeddings"]  # transformers' Qwen3Config defaults to untied
    (tmp_path / "v4" / "config.json").write_text(json.dumps({**config, "rope_theta": rope["rope_theta"]}))
    model = build_from_parts(parts["siglip_vision"][0], tmp_path / "v4", visual_vocab_size=VOCAB)
    assert not model.config.llm_config.tie_word_embeddings
    ids = torch.randint(0, QWEN["vocab_size"], (1, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (model(ids).logits - hf(input_ids=ids).logits).abs().max().item() <= 1e-5


# On the learned grid no resizing happens; a 2x6 grid checks our bicubic resize against SigLIP's own
# interpolate_pos_encoding (NaFlex resizes bilinearly with antialias, unlike Ovis, so only the learned grid).
SIZES = [(kind, GRID * PATCH, GRID * PATCH) for kind in VISION_KINDS] + \
    [(kind, 2 * PATCH, 6 * PATCH) for kind in VISION_KINDS if not kind.startswith("siglip2")]


@pytest.mark.parametrize("kind,height,width", SIZES)
def test_patch_and_position_embeddings_match_hf(parts, kind, height, width):
    vdir, hf = parts[kind]
    model = build_from_parts(vdir, parts["tied"][0], visual_vocab_size=VOCAB)
    image = torch.randn(3, height, width, generator=torch.Generator().manual_seed(4))
    grid = torch.tensor([[1, height // PATCH, width // PATCH]])
    with torch.no_grad():
        ours = model.visual_tokenizer.vit.vision_model.embeddings(patch_rows(image), grid)
        emb = vision_tower(hf).embeddings
        if kind.startswith("siglip2"):
            ref = emb(naflex_patches(image)[None], torch.tensor([[height // PATCH, width // PATCH]]))
        else:
            ref = emb(image[None], interpolate_pos_encoding=True)
    layout = VisionLayout(grid, model.config.vit_config, torch.device("cpu"))
    ref = ref[0][layout.rows * (width // PATCH) + layout.cols]  # HF rows are row-major over the patch grid
    assert (ours - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("llm", ["tied", "untied"])
def test_built_model_runs_and_round_trips(parts, llm, tmp_path):
    torch.manual_seed(0)
    model = build_from_parts(parts["siglip_full"][0], parts[llm][0], visual_vocab_size=VOCAB,
                             window_size=32, fullatt_block_indexes=[1])
    grid = torch.tensor([[1, 4, 6], [1, 2, 2]])
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * PATCH * PATCH)
    atoms = [-300] * model.num_visual_atoms(grid[:1]), [-300] * model.num_visual_atoms(grid[1:])
    ids = torch.tensor([[5, 6, -301, *atoms[0], -302, 7, -301, *atoms[1], -302, 8, 9]])
    with torch.no_grad():
        logits = model(ids, pixels, grid).logits
    assert logits.shape == (1, ids.shape[1], QWEN["vocab_size"]) and logits.isfinite().all()
    model.save_pretrained(tmp_path / "ovis", max_shard_bytes=20_000)
    loaded = Ovis.from_pretrained(tmp_path / "ovis")
    assert loaded.config.to_dict() == model.config.to_dict()
    with torch.no_grad():
        assert torch.equal(loaded(ids, pixels, grid).logits, logits)


def test_errors(parts, tmp_path):
    vdir, ldir = parts["siglip_vision"][0], parts["untied"][0]
    with pytest.raises(CheckpointError, match="vision checkpoint directory not found"):
        build_from_parts(tmp_path / "nope", ldir)
    with pytest.raises(CheckpointError, match="LLM checkpoint directory not found"):
        build_from_parts(vdir, tmp_path / "nope")
    with pytest.raises(ConfigError, match="not 'qwen3'"):
        build_from_parts(vdir, vdir)
    with pytest.raises(ConfigError, match="not a SigLIP"):
        build_from_parts(ldir, ldir)

    broken = tmp_path / "missing"
    broken.mkdir()
    (broken / "config.json").write_text((ldir / "config.json").read_text())
    state = load_file(str(ldir / "model.safetensors"))
    save_file({k: v for k, v in state.items() if k != "model.layers.1.mlp.up_proj.weight"},
              str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) model\.layers\.1\.mlp\.up_proj\.weight"):
        build_from_parts(vdir, broken)

    reshaped = tmp_path / "shape"
    reshaped.mkdir()
    config = json.loads((ldir / "config.json").read_text())
    (reshaped / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    save_file(state, str(reshaped / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"mlp\.\w+_proj\.weight' has shape \((64, 32|32, 64)\), "
                                              r"the config expects \((48, 32|32, 48)\)"):
        build_from_parts(vdir, reshaped)

    no_config = tmp_path / "noconfig"
    no_config.mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        build_from_parts(vdir, no_config)

    # a field left out means transformers' default (hidden_size 768), which the weights then contradict
    incomplete = tmp_path / "incomplete"
    shutil.copytree(vdir, incomplete)
    vconfig = json.loads((vdir / "config.json").read_text())
    del vconfig["hidden_size"]
    (incomplete / "config.json").write_text(json.dumps(vconfig))
    with pytest.raises(CheckpointError, match=r"has shape \(32.*the config expects \(768"):
        build_from_parts(incomplete, ldir)

    del config["hidden_size"]
    (reshaped / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="missing required field.*hidden_size"):
        build_from_parts(vdir, reshaped)
