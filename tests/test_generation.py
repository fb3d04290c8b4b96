"""Generation engine and Chat API: reference parity on every fixture chat case, batching, sampling,
streaming, stop strings and parameter validation."""
import math
import random
import re
from functools import lru_cache

import pytest
import torch
from PIL import Image

from conftest import FIXTURES, case_id, cases, load_case, manifest, requires_fixtures
import ovis25
from ovis25.generation import Engine, GenerationConfig, IncrementalDecoder, sample_token

pytestmark = requires_fixtures

CHAT_CASES = cases("chat")
MODELS = sorted({e["model"] for e in CHAT_CASES})


@lru_cache(maxsize=None)
def chat_for(model: str) -> "ovis25.Chat":
    return ovis25.Chat.from_pretrained(FIXTURES / manifest()["models"][model]["dir"])


@lru_cache(maxsize=None)
def fixture(entry_path: str) -> tuple[dict, dict]:
    return load_case(next(e for e in CHAT_CASES if e["path"] == entry_path))


def prompt_of(tensors: dict) -> dict:
    return {"input_ids": tensors["input_ids"], "pixel_values": tensors.get("pixel_values"),
            "grid_thws": tensors.get("grid_thws")}


def reference_config(call: dict, **changes) -> GenerationConfig:
    """What the reference chat() did: greedy, eos from the model config, the call's limits."""
    return GenerationConfig(max_new_tokens=call["max_new_tokens"], enable_thinking=call["enable_thinking"],
                            thinking_budget=call.get("thinking_budget"), **changes)


def uses_budget(call: dict) -> bool:
    return bool(call["enable_thinking"] and call.get("thinking_budget"))


def open_image(name_or_file: str) -> Image.Image:
    images = manifest()["images"]
    return Image.open(FIXTURES / (images[name_or_file]["file"] if name_or_file in images else name_or_file))


def visuals_of(call: dict) -> tuple[list | None, list | None]:
    """History images first, then the new turn's, as chat() combined them."""
    history = call.get("history") or {}
    images = [open_image(x) for x in (history.get("images") or []) + (call.get("image_files") or [])]
    videos = [[open_image(f) for f in v] for v in (history.get("videos") or [])]
    if call.get("video_files"):
        videos.append([open_image(f) for f in call["video_files"]])
    return images or None, videos or None


def check_result(res, case: dict) -> None:
    assert res.token_ids == case["generated_ids"]
    assert res.text == case["response"]
    assert res.thinking == case["thinking"]


# ---- reference parity ---------------------------------------------------------------------------------

@pytest.mark.parametrize("compile_decode", [False, True], ids=["eager", "compile_decode"])
@pytest.mark.parametrize("entry", CHAT_CASES, ids=case_id)
def test_engine_matches_reference(entry, compile_decode, single_thread):
    """Token-exact greedy parity, also with the compiled decode kernel (its float rounding differs from MKL's)."""
    case, tensors = fixture(entry["path"])
    chat = chat_for(entry["model"])
    engine = Engine(chat.model, chat.processor.tokenizer, max_batch_size=1, max_len=512, compile_decode=compile_decode)
    call = case["call"]
    res = engine.generate([prompt_of(tensors)], reference_config(call))[0]
    check_result(res, case)
    assert res.usage["prompt_tokens"] == len(case["input_ids"])
    assert res.usage["completion_tokens"] == len(case["generated_ids"])
    # One pass over the cache: the prompt (and the vision encoder) run once even when the reference re-prefilled.
    assert engine.stats.prefill_calls == 1 and engine.stats.prefill_tokens == len(case["input_ids"])
    assert engine.stats.vision_calls == (0 if case["grid_thws"] is None else 1)
    if uses_budget(call):
        if case["early_stop_ids"] is not None:
            assert engine.early_stop_ids == case["early_stop_ids"]
        phase2 = len(case["generate_calls"]) > 1
        forced = len(case["early_stop_ids"]) + 1 if case["early_stop_appended"] and phase2 else 0
        assert engine.stats.append_tokens == forced


@pytest.mark.parametrize("entry", CHAT_CASES, ids=case_id)
def test_chat_matches_reference(entry):
    case, _ = fixture(entry["path"])
    chat = chat_for(entry["model"])
    call = case["call"]
    images, videos = visuals_of(call)
    conversation = case["conversations"] if call.get("history") else call["prompt"]
    res = chat.generate(conversation, images=images, videos=videos, max_new_tokens=call["max_new_tokens"],
                        enable_thinking=call["enable_thinking"], thinking_budget=call.get("thinking_budget"),
                        min_pixels=call.get("min_pixels"), max_pixels=call.get("max_pixels"))
    check_result(res, case)
    assert res.usage["prompt_tokens"] == len(case["input_ids"])
    if uses_budget(call):
        assert chat.engine.stats.prefill_calls >= 1  # cumulative; the per-call count is checked below
        before = chat.engine.stats.prefill_calls
        chat.generate(conversation, images=images, videos=videos, max_new_tokens=call["max_new_tokens"],
                      enable_thinking=True, thinking_budget=call["thinking_budget"],
                      min_pixels=call.get("min_pixels"), max_pixels=call.get("max_pixels"))
        assert chat.engine.stats.prefill_calls == before + 1


def as_messages(call: dict) -> list[dict] | None:
    """The call as HF-style messages, when its prompt is leading placeholder lines followed by plain text."""
    match = re.fullmatch(r"((?:<(?:image|video)>\n)*)([^<]*)", call["prompt"])
    if call.get("history") or not match:
        return None
    images, videos = visuals_of(call)
    images, videos = iter(images or []), iter(videos or [])
    items = [{"type": "image", "image": next(images)} if tag == "image" else {"type": "video", "video": next(videos)}
             for tag in re.findall(r"<(image|video)>", match[1])]
    return [{"role": "user", "content": items + [{"type": "text", "text": match[2]}]}]


@pytest.mark.parametrize("entry", [e for e in CHAT_CASES if as_messages(fixture(e["path"])[0]["call"])], ids=case_id)
def test_chat_messages_match_reference(entry):
    case, _ = fixture(entry["path"])
    call = case["call"]
    res = chat_for(entry["model"]).generate(
        as_messages(call), max_new_tokens=call["max_new_tokens"], enable_thinking=call["enable_thinking"],
        thinking_budget=call.get("thinking_budget"), min_pixels=call.get("min_pixels"),
        max_pixels=call.get("max_pixels"))
    check_result(res, case)


# ---- batching -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("compile_decode", [False, True], ids=["eager", "compile_decode"])
@pytest.mark.parametrize("model", MODELS)
def test_continuous_batching_matches_one_by_one(model, compile_decode, single_thread):
    """Mixed image/video/text/budget prompts, fewer slots than requests, one joining mid-way, one aborted
    (with compile_decode the decode steps of 1..3 rows use the compiled kernel)."""
    entries = [e for e in CHAT_CASES if e["model"] == model]
    chat = chat_for(model)
    engine = Engine(chat.model, chat.processor.tokenizer, max_batch_size=3, max_len=512, compile_decode=compile_decode)
    fixtures = {e["path"]: fixture(e["path"]) for e in entries}
    first, late = entries[:-1], entries[-1]
    expected, results = {}, {}
    for e in first:
        case, tensors = fixtures[e["path"]]
        rid = engine.add_request(**prompt_of(tensors), config=reference_config(case["call"]), request_id=e["path"])
        expected[rid] = case
    doomed = engine.add_request(**prompt_of(fixtures[first[0]["path"]][1]),
                                config=GenerationConfig(max_new_tokens=50, **NO_EOS))
    steps = 0
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.result
        steps += 1
        if steps == 2:
            case, tensors = fixtures[late["path"]]
            expected[engine.add_request(**prompt_of(tensors), config=reference_config(case["call"]))] = case
        if steps == 3:
            engine.abort(doomed)
    assert doomed not in results and set(results) == set(expected)
    for rid, case in expected.items():
        check_result(results[rid], case)
    assert engine.stats.prefill_calls < len(expected)  # prompts were prefilled together
    assert engine.stats.vision_calls <= engine.stats.prefill_calls  # one vision run per packed prefill
    assert sorted(engine.free_slots) == [0, 1, 2] and not engine.has_unfinished()


def test_chat_generate_batch_equals_generate():
    """Thinking-off cases sharing one pixel budget, cut to the shortest max_new_tokens: every id compared is
    one of the reference's greedy ids."""
    model = MODELS[0]
    chat = chat_for(model)
    groups = {}
    for e in CHAT_CASES:
        case = fixture(e["path"])[0]
        call = case["call"]
        if e["model"] == model and not call["enable_thinking"] and not call.get("history"):
            groups.setdefault((call.get("min_pixels"), call.get("max_pixels")), []).append(case)
    picked = max(groups.values(), key=len)
    assert len(picked) > 1
    calls = [c["call"] for c in picked]
    visuals = [visuals_of(c) for c in calls]
    options = dict(max_new_tokens=min(c["max_new_tokens"] for c in calls), min_pixels=calls[0].get("min_pixels"),
                   max_pixels=calls[0].get("max_pixels"))
    batch = chat.generate_batch([c["prompt"] for c in calls], images=[v[0] for v in visuals],
                                videos=[v[1] for v in visuals], **options)
    for case, (images, videos), res in zip(picked, visuals, batch):
        single = chat.generate(case["call"]["prompt"], images=images, videos=videos, **options)
        assert res.token_ids == single.token_ids == case["generated_ids"][:options["max_new_tokens"]]
        assert res.text == single.text


# ---- sampling -----------------------------------------------------------------------------------------

NO_EOS = dict(eos_token_ids=())  # these checks need replies that run to max_new_tokens on any model


def text_prompt(chat, text: str = "Tell me a story about a fox.") -> dict:
    return {"input_ids": chat.processor.format_conversation([{"from": "human", "value": text}],
                                                            generation_preface="")[0]}


def run(chat, prompts, configs):
    engine = Engine(chat.model, chat.processor.tokenizer, max_batch_size=len(prompts), max_len=256)
    return engine.generate(prompts, configs)


def test_sampling_is_seeded_and_per_request():
    chat = chat_for(MODELS[0])
    prompt = text_prompt(chat)
    sampled = GenerationConfig(max_new_tokens=16, do_sample=True, temperature=1.5, top_p=0.95, top_k=50, seed=1,
                               **NO_EOS)
    a, b = run(chat, [prompt, prompt], [sampled, sampled])
    assert a.token_ids == b.token_ids  # same seed, same tokens, even side by side in one batch
    other = run(chat, [prompt], [sampled.replace(seed=2)])[0]
    assert other.token_ids != a.token_ids
    # A request's samples do not depend on its batch neighbours.
    greedy_neighbour = GenerationConfig(max_new_tokens=5)
    alone, _ = run(chat, [prompt, text_prompt(chat, "Hi")], [sampled, greedy_neighbour])
    assert alone.token_ids == a.token_ids


def test_requests_sharing_a_pixel_tensor_encode_it_once():
    """GRPO's groups and sampled evaluation give one prompt's tensors to several requests: the visual tokenizer
    runs on them once, and every request decodes as it would with a copy of its own."""
    entry = next(e for e in CHAT_CASES if fixture(e["path"])[1].get("pixel_values") is not None)
    case, tensors = fixture(entry["path"])
    chat = chat_for(entry["model"])
    config = reference_config(case["call"])
    shared = [prompt_of(tensors)] * 3
    copies = [{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in prompt_of(tensors).items()}
              for _ in range(3)]
    seen = []
    hook = chat.model.visual_tokenizer.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    try:
        together, apart = run(chat, shared, [config] * 3), run(chat, copies, [config] * 3)
    finally:
        hook.remove()
    assert seen == [tensors["pixel_values"].shape[0], 3 * tensors["pixel_values"].shape[0]]
    for a, b in zip(together, apart):
        check_result(a, case)
        assert a.token_ids == b.token_ids


def test_generate_batch_n_replies_per_conversation():
    chat = chat_for(MODELS[0])
    sampled = dict(max_new_tokens=8, do_sample=True, temperature=1.5, seed=3)
    convs = ["Tell me a story about a fox.", "Hi"]
    replies = chat.generate_batch(convs, n=3, **sampled)
    assert len(replies) == 6
    # reply k of a conversation samples with seed + k, as the server's choices do: the replies differ
    singles = [[chat.generate(c, **{**sampled, "seed": 3 + k}) for k in range(3)] for c in convs]
    assert [r.token_ids for r in replies] == [r.token_ids for one in singles for r in one]
    assert len({tuple(r.token_ids) for r in replies[:3]}) > 1
    # one seed per conversation: each reply depends on its own seed only, not on the rest of the batch
    seeded = chat.generate_batch(convs, n=2, seeds=[10, 20], **{**sampled, "seed": None})
    alone = [chat.generate(c, **{**sampled, "seed": s + k}) for c, s in zip(convs, [10, 20]) for k in range(2)]
    assert [r.token_ids for r in seeded] == [r.token_ids for r in alone]
    with pytest.raises(ValueError, match="n must be a positive int"):
        chat.generate_batch(convs, n=0)
    with pytest.raises(ValueError, match="2 conversations but 1 seeds"):
        chat.generate_batch(convs, seeds=[1])


def test_top_k_1_and_zero_temperature_equal_greedy():
    chat = chat_for(MODELS[0])
    prompt = text_prompt(chat)
    greedy = GenerationConfig(max_new_tokens=12, **NO_EOS)
    ref = run(chat, [prompt], [greedy])[0].token_ids
    for changes in (dict(top_k=1, temperature=2.0), dict(temperature=0.0)):
        res = run(chat, [prompt], [greedy.replace(do_sample=True, seed=3, **changes)])[0]
        assert res.token_ids == ref, changes


def test_repetition_penalty_and_generation_config_defaults():
    model_dir = FIXTURES / manifest()["models"][MODELS[0]]["dir"]
    config = GenerationConfig.from_pretrained(model_dir)
    raw = manifest()["models"][MODELS[0]]
    assert config.do_sample and config.repetition_penalty != 1.0
    assert set(config.eos_token_ids) >= {raw["special_token_ids"]["<|im_end|>"]}
    chat = chat_for(MODELS[0])
    prompt = text_prompt(chat)
    plain = run(chat, [prompt], [GenerationConfig(max_new_tokens=24, **NO_EOS)])[0].token_ids
    penalised = run(chat, [prompt], [GenerationConfig(max_new_tokens=24, repetition_penalty=3.0, **NO_EOS)])[0]
    assert penalised.token_ids != plain
    # HF semantics on the generated ids: positive logits are divided, negative ones multiplied.
    logits = torch.tensor([2.0, 1.9, -1.0, -1.2])
    assert sample_token(logits, GenerationConfig(repetition_penalty=2.0), [0]) == 1
    assert sample_token(torch.tensor([-1.0, -1.2]), GenerationConfig(repetition_penalty=2.0), [0]) == 1


# ---- streaming and detokenisation ---------------------------------------------------------------------

def test_incremental_decoder_never_splits_characters():
    tokenizer = chat_for(MODELS[0]).processor.tokenizer
    text = "Grüße, 世界! 🦊 naïve café — ½ ∑ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢"
    ids = tokenizer.encode(text)
    # The check only means something if some id holds part of a character.
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    decoder = IncrementalDecoder(tokenizer)
    deltas = [decoder.push(i) for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + decoder.flush() == text
    # Arbitrary id sequences (invalid byte runs, special tokens) still join to the full decode.
    rng = random.Random(0)
    vocab = len(tokenizer)
    for _ in range(50):
        seq = [rng.randrange(vocab) for _ in range(rng.randrange(1, 30))]
        decoder = IncrementalDecoder(tokenizer)
        joined = "".join(decoder.push(i) for i in seq) + decoder.flush()
        assert joined == tokenizer.decode(seq, skip_special_tokens=True)


def test_stream_joins_to_final_text():
    longest = 0
    for entry in CHAT_CASES:
        case, _ = fixture(entry["path"])
        call = case["call"]
        if call.get("history") or call.get("video_files"):
            continue
        chat = chat_for(entry["model"])
        images, _ = visuals_of(call)
        deltas = list(chat.stream(call["prompt"], images=images, max_new_tokens=call["max_new_tokens"],
                                  enable_thinking=call["enable_thinking"], thinking_budget=call.get("thinking_budget"),
                                  min_pixels=call.get("min_pixels"), max_pixels=call.get("max_pixels")))
        assert "".join(deltas) == chat.last_result.text == case["response"], entry["path"]
        assert all(deltas)
        longest = max(longest, len(deltas))
    assert longest > 1  # the text really arrives piece by piece


@pytest.mark.parametrize("entry", [e for e in CHAT_CASES if fixture(e["path"])[0]["thinking"]], ids=case_id)
def test_engine_streams_thinking_and_answer_separately(entry):
    case, tensors = fixture(entry["path"])
    chat = chat_for(entry["model"])
    engine = Engine(chat.model, chat.processor.tokenizer, max_batch_size=1, max_len=512)
    rid = engine.add_request(**prompt_of(tensors), config=reference_config(case["call"]))
    outs = list(engine.stream(rid))
    assert "".join(o.thinking for o in outs) == case["thinking"]
    assert "".join(o.text for o in outs) == case["response"]
    assert [i for o in outs for i in o.token_ids] == case["generated_ids"]


def test_interleaved_streams():
    chat = chat_for(MODELS[0])
    options = dict(max_new_tokens=12)
    prompts = ["Tell me a story about a fox.", "Count to ten."]
    expected = [chat.generate(p, **options).text for p in prompts]
    streams = [chat.stream(p, **options) for p in prompts]
    joined = ["", ""]
    for pair in zip(*streams):  # alternate between the two generators
        for i, delta in enumerate(pair):
            joined[i] += delta
    for i, stream in enumerate(streams):
        joined[i] += "".join(stream)
    assert joined == expected


# ---- stop strings and limits --------------------------------------------------------------------------

def test_stop_strings():
    chat = chat_for(MODELS[0])
    prompt = text_prompt(chat, "Write a long list of words.")
    config = GenerationConfig(max_new_tokens=40, **NO_EOS)
    full = run(chat, [prompt], [config])[0]
    raw = chat.processor.tokenizer.decode(full.token_ids, skip_special_tokens=True)
    # a stop string starting inside the text (not at a token boundary necessarily)
    start = next(i for i in range(len(raw) // 3, len(raw)) if not raw[i].isspace())
    stop = raw[start:start + 3]
    cut = raw.find(stop)
    stopped = config.replace(stop=("a long stop string that never appears", stop))
    res = run(chat, [prompt], [stopped])[0]
    assert res.finish_reason == "stop"
    assert res.text == raw[:cut].strip()
    assert res.token_ids == full.token_ids[:len(res.token_ids)] and len(res.token_ids) < len(full.token_ids)
    # streaming holds back what may be the start of a stop string, so it never shows any part of one
    engine = Engine(chat.model, chat.processor.tokenizer, max_batch_size=1, max_len=256)
    deltas = [o.text for o in engine.stream(engine.add_request(**prompt, config=stopped))]
    assert "".join(deltas) == res.text


def test_cache_limit_and_max_new_tokens():
    chat = chat_for(MODELS[0])
    prompt = text_prompt(chat)
    n = prompt["input_ids"].numel()
    full = run(chat, [prompt], [GenerationConfig(max_new_tokens=10, **NO_EOS)])[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 10
    engine = Engine(chat.model, chat.processor.tokenizer, max_batch_size=1, max_len=n + 3)
    res = engine.generate([prompt], GenerationConfig(max_new_tokens=10, **NO_EOS))[0]
    assert res.finish_reason == "length" and res.token_ids == full.token_ids[:4]  # the last id needs no slot


# ---- validation ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, name", [
    (dict(temperature=-0.5), "temperature"), (dict(temperature=math.nan), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_p=math.nan), "top_p"),
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(max_new_tokens=-3), "max_new_tokens"),
    (dict(top_k=-1), "top_k"), (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(thinking_budget=-1), "thinking_budget"), (dict(seed=1.5), "seed"), (dict(stop=[""]), "stop"),
])
def test_bad_parameters(bad, name):
    with pytest.raises(ValueError, match=name):
        GenerationConfig(**bad)
    with pytest.raises(ValueError, match=name):
        chat_for(MODELS[0]).generate("Hi", **bad)
    with pytest.raises(ValueError, match=name):
        chat_for(MODELS[0]).stream("Hi", **bad)  # at the call, before any iteration


def test_bad_requests():
    chat = chat_for(MODELS[0])
    prompt = text_prompt(chat)
    engine = Engine(chat.model, chat.processor.tokenizer, max_batch_size=1, max_len=8)
    with pytest.raises(ValueError, match="max_len"):
        engine.add_request(prompt["input_ids"])
    engine = Engine(chat.model, chat.processor.tokenizer, max_batch_size=1, max_len=256)
    with pytest.raises(ValueError, match="visual atom"):
        engine.add_request(torch.tensor([1, -301, -300, -302, 2]))
    with pytest.raises(ValueError, match="invalid id"):
        engine.add_request(torch.tensor([1, -200, 2]))
    with pytest.raises(TypeError, match="unknown option"):
        chat.generate("Hi", temprature=0.5)
    with pytest.raises(ValueError, match="content items"):
        chat.generate([{"role": "user", "content": "Hi"}], images=[Image.new("RGB", (32, 32))])
