"""Core model against the reference fixtures, released shapes, checkpoint layout, invariants and errors."""
import json
import re
import shutil
from functools import lru_cache

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import FIXTURES, assert_close, case_id, cases, load_case, manifest, model_dirs, requires_fixtures
from ovis25 import Ovis
from ovis25.checkpoint import INDEX_FILE, SINGLE_FILE, CheckpointError, checkpoint_files, model_state_for_saving
from ovis25.config import ConfigError, ovis2_5_2b, ovis2_5_9b
from ovis25.model.llm import AttnContext, KVCache
from ovis25.model.vision import VisionLayout

MODEL_CASES = cases("chat") + cases("train")
MODEL_NAMES = [p.name for p in model_dirs()]
# bfloat16 against float32, measured on the public fixtures: max |logits diff| / max |logits| <= 0.038,
# max |visual_probs diff| <= 0.0037. The bounds leave about 2x headroom (bf16 has an 8-bit mantissa).
BF16_LOGITS_REL, BF16_PROBS_ABS = 0.08, 0.01


@lru_cache(maxsize=None)
def load(name: str, dtype: torch.dtype = torch.float32) -> Ovis:
    return Ovis.from_pretrained(FIXTURES / manifest()["models"][name]["dir"], dtype=dtype)


def inputs(tensors: dict) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    return tensors["input_ids"], tensors.get("pixel_values"), tensors.get("grid_thws")


@lru_cache(maxsize=None)
def sequences(name: str) -> list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]:
    """(input_ids (L,), pixel_values, grid_thws) of the model's chat cases, one per distinct prompt length."""
    out, seen = [], set()
    for entry in cases("chat", name):
        ids, pixels, grid = inputs(load_case(entry)[1])
        if ids.shape[1] not in seen:
            seen.add(ids.shape[1])
            out.append((ids[0], pixels, grid))
    return out


def cat_vision(seqs) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    with_images = [(p, g) for _, p, g in seqs if g is not None]
    if not with_images:
        return None, None
    return torch.cat([p for p, _ in with_images]), torch.cat([g for _, g in with_images])


def pick(name: str):
    """Sequences of different lengths: the shortest and (when there are such) the two shortest with images."""
    seqs = sorted(sequences(name), key=lambda s: s[0].shape[0])
    chosen = seqs[:1] + [s for s in seqs if s[2] is not None][:2]
    return list({id(s): s for s in chosen}.values())


# ---- parity with the reference ------------------------------------------------------------------------

@requires_fixtures
@pytest.mark.parametrize("entry", MODEL_CASES, ids=case_id)
def test_case_matches_reference(entry):
    case, t = load_case(entry)
    model = load(entry["model"])
    ids, pixels, grid = inputs(t)
    vt = model.visual_tokenizer
    with torch.no_grad():
        if grid is not None:
            assert {"vit_features", "visual_probs", "visual_embeds", "visual_indicator_embeds"} <= set(t)
            features, per_layer = vt.vit(pixels, grid, output_hidden_states=True)
            assert_close(features, t["vit_features"], "vit_features")
            assert_close(vt(pixels, grid), t["visual_probs"], "visual_probs")
            assert_close(model.visual_embeddings(pixels, grid), t["visual_embeds"], "visual_embeds")
            if "vit_hidden_states_per_layer" in t:
                assert_close(torch.stack(per_layer), t["vit_hidden_states_per_layer"], "vit_hidden_states_per_layer")
            if "visual_head_logits" in t:
                assert_close(vt.head_logits(features), t["visual_head_logits"], "visual_head_logits")
            if "vit_embeddings" in t:
                assert_close(vt.vit.vision_model.embeddings(pixels, grid), t["vit_embeddings"], "vit_embeddings")
        if "visual_indicator_embeds" in t:
            assert torch.equal(model.vte.weight[-4:], t["visual_indicator_embeds"])
        assert_close(model.merge_embeddings(ids, pixels, grid), t["inputs_embeds"], "inputs_embeds")
        out = model(ids, pixels, grid, attention_mask=torch.ones_like(ids),
                    output_hidden_states="llm_hidden_states" in t)
        assert_close(out.logits[:, case["logits_first_position"]:], t["logits"], "logits")
        if "llm_hidden_states" in t:
            assert_close(torch.stack(out.hidden_states), t["llm_hidden_states"], "llm_hidden_states")
        if "labels" in t:
            loss = model(ids, pixels, grid, labels=t["labels"]).loss
            assert_close(loss, torch.tensor(case["loss"]), "loss")


@requires_fixtures
@pytest.mark.parametrize("entry", [e for e in MODEL_CASES if "vit_window_index" in e["tensors"]], ids=case_id)
def test_vision_layout_and_rotary_match_reference(entry):
    _, t = load_case(entry)
    model = load(entry["model"])
    layout = VisionLayout(t["grid_thws"], model.config.vit_config, torch.device("cpu"))
    assert torch.equal(layout.group_window_order, t["vit_window_index"])
    assert torch.equal(layout.window_cu, t["vit_cu_window_seqlens"])
    assert torch.equal(layout.frame_cu, t["vit_cu_seqlens"])
    cos, sin = model.visual_tokenizer.vit.rotary(layout)
    angles = torch.cat([t["vit_rotary_pos_emb"]] * 2, dim=-1)  # rotate-half: the angles are used twice
    assert_close(cos[:, 0], angles.cos(), "vit_rotary_pos_emb")
    assert_close(sin[:, 0], angles.sin(), "vit_rotary_pos_emb")


@requires_fixtures
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_bfloat16_stays_close_to_float32(name):
    m32, m16 = load(name), load(name, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m16.parameters())
    for ids, pixels, grid in sequences(name):
        with torch.no_grad():
            l32, l16 = m32(ids[None], pixels, grid).logits, m16(ids[None], pixels, grid).logits.float()
            rel = ((l32 - l16).abs().max() / l32.abs().max()).item()
            assert rel <= BF16_LOGITS_REL, f"bf16 logits deviate by {rel:.3g} of their scale"
            if grid is not None:
                probs = (m32.visual_tokenizer(pixels, grid) - m16.visual_tokenizer(pixels, grid).float()).abs().max()
                assert probs.item() <= BF16_PROBS_ABS, f"bf16 visual_probs deviate by {probs.item():.3g}"


# ---- released shapes ------------------------------------------------------------------------------------

def key_pattern(keys) -> set[str]:
    return {re.sub(r"layers\.\d+\.", "layers.N.", k) for k in keys if k != "llm.lm_head.weight"}


@pytest.mark.parametrize("make,params,hidden", [(ovis2_5_2b, 2.57e9, 2048), (ovis2_5_9b, 9.18e9, 4096)],
                         ids=["2B", "9B"])
def test_released_configs(make, params, hidden):
    config = make()
    with torch.device("meta"):
        model = Ovis.from_config(config)
    count = sum(p.numel() for p in model.parameters())  # parameters() yields a tied matrix once
    assert abs(count / params - 1) < 0.005, f"{count:,} parameters, expected about {params:.3g}"
    state = model_state_for_saving(model)
    tied = config.llm_config.tie_word_embeddings
    assert ("llm.lm_head.weight" in state) == (not tied)
    for name in MODEL_NAMES:  # the same tensor names as the fixture checkpoints, up to layer counts
        assert key_pattern(state) == key_pattern(manifest()["models"][name]["safetensors_keys"])
    vc, lc = config.vit_config, config.llm_config
    assert sum(k.endswith("layer_norm1.weight") for k in state) == vc.num_hidden_layers == 27
    assert sum(k.endswith("input_layernorm.weight") for k in state) == lc.num_hidden_layers
    shapes = {"vte.weight": (65536, hidden), "visual_tokenizer.head.0.weight": (65532, 4608),
              "visual_tokenizer.head.1.weight": (65532,),
              "visual_tokenizer.vit.vision_model.embeddings.patch_embedding.weight": (1152, 3, 16, 16),
              "visual_tokenizer.vit.vision_model.embeddings.position_embedding.weight": (1024, 1152),
              "visual_tokenizer.vit.vision_model.encoder.layers.0.mlp.fc1.weight": (4304, 1152),
              "llm.model.embed_tokens.weight": (151936, hidden),
              "llm.model.layers.0.self_attn.q_proj.weight": (lc.num_attention_heads * 128, hidden),
              "llm.model.layers.0.self_attn.k_proj.weight": (8 * 128, hidden),
              "llm.model.layers.0.self_attn.q_norm.weight": (128,)}
    if not tied:
        shapes["llm.lm_head.weight"] = (151936, hidden)
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key


# ---- checkpoint layout ----------------------------------------------------------------------------------

def saved_keys(path) -> set[str]:
    keys = set()
    for file in checkpoint_files(path):
        with safe_open(str(file), framework="pt") as f:
            keys.update(f.keys())
    return keys


@requires_fixtures
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_save_layout_and_sharded_round_trip(name, tmp_path):
    source = FIXTURES / manifest()["models"][name]["dir"]
    model = load(name)
    model.save_pretrained(tmp_path / "single")
    total = sum(t.numel() * t.element_size() for t in model_state_for_saving(model).values())
    model.save_pretrained(tmp_path / "sharded", max_shard_bytes=total // 5)
    assert (tmp_path / "single" / SINGLE_FILE).exists() and not (tmp_path / "single" / INDEX_FILE).exists()
    assert len(checkpoint_files(tmp_path / "sharded")) >= 5
    expected_keys = set(manifest()["models"][name]["safetensors_keys"])
    reference_config = json.loads((source / "config.json").read_text())
    ids, pixels, grid = sequences(name)[-1]
    with torch.no_grad():
        logits = model(ids[None], pixels, grid).logits
    for path in (tmp_path / "single", tmp_path / "sharded"):
        assert json.loads((path / "config.json").read_text()) == reference_config
        assert saved_keys(path) == expected_keys
        loaded = Ovis.from_pretrained(path)
        assert loaded.config.llm_config.tie_word_embeddings == ("llm.lm_head.weight" not in expected_keys)
        assert (loaded.llm.lm_head.weight is loaded.llm.model.embed_tokens.weight) == \
            loaded.config.llm_config.tie_word_embeddings
        for key, value in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key
        with torch.no_grad():
            assert torch.equal(loaded(ids[None], pixels, grid).logits, logits)


# ---- invariants -----------------------------------------------------------------------------------------

@requires_fixtures
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_packed_vision_equals_one_call_per_image(name):
    vit = load(name).visual_tokenizer.vit
    images = []  # (pixel_values, grid row) of every image / video in the model's chat cases
    for _, pixels, grid in sequences(name):
        if grid is not None:
            images += zip(pixels.split(grid.prod(-1).tolist()), grid[:, None])
    assert len(images) > 1
    with torch.no_grad():
        alone = torch.cat([vit(p, g) for p, g in images])
        packed = vit(torch.cat([p for p, _ in images]), torch.cat([g for _, g in images]))
    assert_close(packed, alone, "vit_features")


@requires_fixtures
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_padded_batch_equals_single_prompts(name, side):
    model = load(name)
    seqs = pick(name)
    width = max(ids.shape[0] for ids, _, _ in seqs)
    batch = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(batch)
    spans = []
    for row, (ids, _, _) in enumerate(seqs):
        start = 0 if side == "right" else width - ids.shape[0]
        batch[row, start:start + ids.shape[0]], mask[row, start:start + ids.shape[0]] = ids, 1
        spans.append(slice(start, start + ids.shape[0]))
    with torch.no_grad():
        logits = model(batch, *cat_vision(seqs), attention_mask=mask).logits
        for row, (ids, pixels, grid) in enumerate(seqs):
            assert_close(logits[row, spans[row]], model(ids[None], pixels, grid).logits[0], "logits")


@requires_fixtures
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_packed_sequences_equal_separate_forwards(name):
    model = load(name)
    seqs = pick(name)
    lengths = [ids.shape[0] for ids, _, _ in seqs]
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    ids = torch.cat([ids for ids, _, _ in seqs])[None]
    with torch.no_grad():
        logits = model(ids, *cat_vision(seqs), position_ids=positions, cu_seqlens=cu).logits[0]
        for i, (ids, pixels, grid) in enumerate(seqs):
            assert_close(logits[cu[i]:cu[i + 1]], model(ids[None], pixels, grid).logits[0], "logits")


@requires_fixtures
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_packed_forward_under_bfloat16_autocast(name):
    """Training under autocast: equal-length segments share one attention call (the grouped path), which CPU
    autocast runs in float32; logits stay within bfloat16 error of float32."""
    model = load(name)
    seq = pick(name)[-1]
    seqs = [seq, seq]  # two segments of the same length
    n = seq[0].shape[0]
    cu = torch.tensor([0, n, 2 * n], dtype=torch.int32)
    ids = torch.cat([seq[0], seq[0]])[None]
    positions = torch.cat([torch.arange(n)] * 2)[None]
    with torch.no_grad():
        l32 = model(ids, *cat_vision(seqs), position_ids=positions, cu_seqlens=cu).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            l16 = model(ids, *cat_vision(seqs), position_ids=positions, cu_seqlens=cu).logits.float()
    rel = ((l32 - l16).abs().max() / l32.abs().max()).item()
    assert rel <= BF16_LOGITS_REL, f"autocast logits deviate by {rel:.3g} of their scale"


@requires_fixtures
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_kv_cache_matches_full_forward(name):
    """Chunked prefill of two prompts into two slots, then batched one-token decode steps."""
    model = load(name)
    runs = []
    for entry in cases("chat", name):
        case, t = load_case(entry)
        if len(case["generated_ids"]) >= 2 and len(runs) < 2:
            runs.append((t, torch.tensor(case["generated_ids"])))
    assert runs, f"{name}: no chat case with at least two generated ids"
    steps = min(len(gen) for _, gen in runs)
    llm, head = model.llm, model.llm.lm_head
    cache = KVCache(model.config.llm_config, num_slots=len(runs), max_len=512, dtype=torch.float32)
    embeds, full, prompt_lens = [], [], []
    with torch.no_grad():
        for t, gen in runs:
            ids, pixels, grid = inputs(t)
            all_ids = torch.cat([ids[0], gen[:steps]])[None]
            embeds.append(model.merge_embeddings(all_ids, pixels, grid)[0])
            full.append(model(all_ids, pixels, grid).logits[0])
            prompt_lens.append(ids.shape[1])
        cached = [[] for _ in runs]
        for lo, hi in ((0, 0.5), (0.5, 1)):  # the second chunk attends to the first through the cache
            chunks = [(int(n * lo), int(n * hi)) for n in prompt_lens]
            x = torch.cat([e[a:b] for e, (a, b) in zip(embeds, chunks)])[None]
            cu = torch.tensor([0] + [b - a for a, b in chunks]).cumsum(0)
            pos = torch.cat([torch.arange(a, b) for a, b in chunks])[None]
            logits = head(llm(x, pos, AttnContext(cu_seqlens=cu, cache=cache, slots=list(range(len(runs))))))[0]
            for i in range(len(runs)):
                cached[i].append(logits[cu[i]:cu[i + 1]])
        for step in range(steps - 1):  # decode: row i feeds its next token at its own position
            x = torch.stack([e[n + step] for e, n in zip(embeds, prompt_lens)])[:, None]
            pos = torch.tensor([[n + step] for n in prompt_lens])
            logits = head(llm(x, pos, AttnContext(cache=cache, slots=list(range(len(runs))))))
            for i in range(len(runs)):
                cached[i].append(logits[i])
    for i in range(len(runs)):
        assert_close(torch.cat(cached[i]), full[i][:prompt_lens[i] + steps - 1], "logits")


# ---- errors ---------------------------------------------------------------------------------------------

def copy_model(name: str, dest):
    shutil.copytree(FIXTURES / manifest()["models"][name]["dir"], dest)
    return dest


def edit_config(path, edit) -> None:
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))


@requires_fixtures
@pytest.mark.parametrize("section,field", [(None, "visual_vocab_size"), ("vit_config", "hidden_size"),
                                           ("llm_config", "num_key_value_heads"), (None, "llm_config")])
def test_config_missing_required_field(tmp_path, section, field):
    path = copy_model(MODEL_NAMES[0], tmp_path / "m")
    edit_config(path, lambda c: (c[section] if section else c).pop(field))
    with pytest.raises(ConfigError, match=f"missing required field.*{field}"):
        Ovis.from_pretrained(path)


@requires_fixtures
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_checkpoint_tensor_errors(tmp_path, name):
    path = copy_model(name, tmp_path / "m")
    state = load_file(str(path / SINGLE_FILE))
    victim = sorted(k for k in state if "layers.1." in k and k.startswith("llm."))[0]

    save_file({k: v for k, v in state.items() if k != victim}, str(path / SINGLE_FILE))
    with pytest.raises(CheckpointError, match=rf"missing tensor\(s\) {re.escape(victim)}"):
        Ovis.from_pretrained(path)

    save_file({**state, victim: state[victim][:-1]}, str(path / SINGLE_FILE))
    with pytest.raises(CheckpointError, match=rf"{re.escape(victim)}' has shape .* the config expects"):
        Ovis.from_pretrained(path)

    save_file({**state, "llm.extra.weight": torch.zeros(2)}, str(path / SINGLE_FILE))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'llm\.extra\.weight'"):
        Ovis.from_pretrained(path)


@requires_fixtures
def test_index_shard_outside_directory_rejected(tmp_path):
    path = copy_model(MODEL_NAMES[0], tmp_path / "m")
    (path / SINGLE_FILE).rename(tmp_path / "outside.safetensors")  # a real file, but not inside the checkpoint
    keys = manifest()["models"][MODEL_NAMES[0]]["safetensors_keys"]
    (path / INDEX_FILE).write_text(json.dumps({"weight_map": dict.fromkeys(keys, "../outside.safetensors")}))
    with pytest.raises(CheckpointError, match="not a .safetensors file inside the checkpoint"):
        Ovis.from_pretrained(path)


@requires_fixtures
def test_input_errors():
    name = MODEL_NAMES[0]
    ids, pixels, grid = next(s for s in sequences(name) if s[2] is not None)
    model = load(name)
    atoms = (ids == -300).nonzero()[:, 0]
    with pytest.raises(ValueError, match="visual atom positions"):
        model(torch.cat([ids[:atoms[0]], ids[atoms[0] + 1:]])[None], pixels, grid)
    with pytest.raises(ValueError, match=r"placeholders \(-200/-201\)"):
        model(torch.tensor([[1, -200, 2]]), pixels, grid)
    with pytest.raises(ValueError, match="pixel_values has .* rows but grid_thws describe"):
        model(ids[None], pixels[:-4], grid)
