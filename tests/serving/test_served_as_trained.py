"""vLLM serves what we write exactly as we trained it, from *text*: for a full final/ folder in every chat
format we support (SentencePiece v1, v2, v3, v7; Tekken v3, v7, v11, v13, v15), a LoRA adapter on its base,
merged/ in bf16 and a classification folder, vLLM's own tokenization and chat-template path (with tool
definitions, tool calls and tool results where the format has tools) give our prompt ids, and the served
model gives our greedy tokens and prompt log-probs (fp32: 1e-5). A Tekken folder served in vLLM's mistral
mode (tekken.json read by mistral-common) gives our prompt ids too."""

from __future__ import annotations

import types

import pytest
import torch

from mistral_train import Mistral
from mistral_train.adapters import LoraConfig, apply_lora, save_adapter
from mistral_train.tokenizer.files import write_tokenizer_files
from mistral_train.train.export import merge_adapter_folder
from tests.serving._served import (CHATS, FORMATS, TEXTS, TOOLS, bundled, close_engine, first_difference,
                                   format_tokenizer, our_greedy, our_prompt_logprobs, reasoning_chat, scoring_params,
                                   start_engine, tiny_model, tool_chats, vllm_prompt_logprobs, write_full_folder)

FP32_TOL = 1e-5


def assert_served_as_ours(model: Mistral, tokenizer, outputs, expected_prompts: list[list[int]], tol: float = FP32_TOL,
                          greedy: bool = True) -> None:
    """Each vLLM output: prompt ids equal ours, prompt log-probs within `tol`, greedy tokens equal ours."""
    for out, ids in zip(outputs, expected_prompts, strict=True):
        served = list(out.prompt_token_ids)
        assert served == ids, first_difference(ids, served)
        diff = float((vllm_prompt_logprobs(out) - our_prompt_logprobs(model, ids)).abs().max())
        assert diff <= tol, f"prompt {ids}: max |log-prob difference| {diff:.2e} > {tol:.0e}"
        if greedy:
            assert list(out.outputs[0].token_ids) == our_greedy(model, ids, tokenizer.eos_id), ids


def _served_folder(case: str, root, seed: int, **engine_kwargs) -> types.SimpleNamespace:
    """A full fine-tune's final/ folder for a FORMATS case, and vLLM serving it in fp32."""
    tokenizer, fmt = format_tokenizer(case, root)
    # v1 ties the output head to the embedding, as the default recipe's tiny model does
    model = tiny_model(tokenizer.vocab_size, seed=seed, tie_word_embeddings=case == "v1")
    folder = write_full_folder(model, tokenizer, root / "final", fmt)
    return types.SimpleNamespace(fmt=fmt, tokenizer=tokenizer, model=model, llm=start_engine(folder, **engine_kwargs))


@pytest.fixture(scope="module", params=list(FORMATS))
def full(request, tmp_path_factory):
    served = _served_folder(request.param, tmp_path_factory.mktemp(f"full_{request.param}"), seed=1)
    yield served
    close_engine(served.llm)


def _chat_prompts(served, chats, tools=None, **template_kwargs) -> list[list[int]]:
    return [served.tokenizer.apply_chat_template(c, served.fmt, add_generation_prompt=True, tools=tools, **template_kwargs)
            for c in chats]


def test_full_folder_text_prompts(full):
    outputs = full.llm.generate(TEXTS, scoring_params(), use_tqdm=False)
    assert_served_as_ours(full.model, full.tokenizer, outputs, [full.tokenizer.encode(t, bos=True) for t in TEXTS])


def test_full_folder_chat_messages(full):
    # LLM.chat renders the folder's chat_template with vLLM's own code, then tokenizes the text
    reasons = int(full.fmt[1:]) >= 13
    chats = CHATS + ([reasoning_chat()] if reasons else [])
    outputs = full.llm.chat(chats, scoring_params(), use_tqdm=False)
    assert_served_as_ours(full.model, full.tokenizer, outputs, _chat_prompts(full, chats))
    if reasons:
        # a limit of vLLM 0.32's LLM.chat, not of the folder: it passes an earlier answer's reasoning on only when
        # the client names it `reasoning`; under `reasoning_content` (our training rows' key) it drops it, so the
        # prompt lacks exactly the [THINK]...[/THINK] span ours has
        dropped = reasoning_chat("reasoning_content")
        served = list(full.llm.chat([dropped], scoring_params(1), use_tqdm=False)[0].prompt_token_ids)
        ours = _chat_prompts(full, [dropped])[0]
        start, stop = ours.index(full.tokenizer.control_id("[THINK]")), ours.index(full.tokenizer.control_id("[/THINK]"))
        assert served == ours[:start] + ours[stop + 1:], first_difference(ours, served)


def test_full_folder_chats_with_tools(full):
    """Tool definitions, parallel calls (arguments a JSON string and an object), results out of call order,
    text beside calls (v7+): LLM.chat(..., tools=) gives our ids. v1 has no tools: the folder's template refuses
    them with its reason, as we do, rather than dropping them."""
    if full.fmt == "v1":
        with pytest.raises(ValueError, match="no tool definitions"):
            full.tokenizer.apply_chat_template(CHATS[0], full.fmt, add_generation_prompt=True, tools=TOOLS)
        with pytest.raises(Exception, match="tool definitions are not in this chat template"):
            full.llm.chat(CHATS[:1], scoring_params(), tools=TOOLS, use_tqdm=False)
        return
    chats = tool_chats(full.fmt)
    outputs = full.llm.chat(chats, scoring_params(), tools=TOOLS, use_tqdm=False)
    assert_served_as_ours(full.model, full.tokenizer, outputs, _chat_prompts(full, chats, TOOLS))
    if full.fmt == "v15":  # a model setting, passed as vLLM passes template arguments
        high = full.llm.chat(chats[1:2], scoring_params(), tools=TOOLS, use_tqdm=False,
                             chat_template_kwargs={"reasoning_effort": "high"})
        assert_served_as_ours(full.model, full.tokenizer, high, _chat_prompts(full, chats[1:2], TOOLS,
                                                                              reasoning_effort="high"))


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    """A Tekken v15 final/ folder served in vLLM's mistral mode: tekken.json read through mistral-common."""
    served = _served_folder("tekken-v15", tmp_path_factory.mktemp("native_v15"), seed=6, tokenizer_mode="mistral")
    yield served
    close_engine(served.llm)


def test_tekken_folder_in_vllm_mistral_mode(native):
    assert type(native.llm.get_tokenizer()).__name__ == "MistralTokenizer"  # mistral-common's, not tokenizer.json
    texts = native.llm.generate(TEXTS, scoring_params(), use_tqdm=False)
    assert_served_as_ours(native.model, native.tokenizer, texts, [native.tokenizer.encode(t, bos=True) for t in TEXTS])
    chats = CHATS + [reasoning_chat(), reasoning_chat("reasoning_content")]
    plain = native.llm.chat(chats, scoring_params(), use_tqdm=False)
    assert_served_as_ours(native.model, native.tokenizer, plain, _chat_prompts(native, chats))
    tools = native.llm.chat(tool_chats("v15"), scoring_params(), tools=TOOLS, use_tqdm=False)
    assert_served_as_ours(native.model, native.tokenizer, tools, _chat_prompts(native, tool_chats("v15"), TOOLS))
    high = native.llm.chat(tool_chats("v15")[1:2], scoring_params(), tools=TOOLS, use_tqdm=False,
                           chat_template_kwargs={"reasoning_effort": "high"})
    assert_served_as_ours(native.model, native.tokenizer, high,
                          _chat_prompts(native, tool_chats("v15")[1:2], TOOLS, reasoning_effort="high"))


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory):
    """A base folder, a LoRA adapter folder as an adapter run's final/ holds it, and vLLM serving the base
    with LoRA enabled. The adapter's B matrices are random (a trained adapter), so it changes the outputs."""
    tokenizer = bundled("v3")
    root = tmp_path_factory.mktemp("adapter")
    base_model = tiny_model(tokenizer.vocab_size, seed=2)
    base = write_full_folder(base_model, tokenizer, root / "base", "v3")
    model = apply_lora(tiny_model(tokenizer.vocab_size, seed=2),
                       LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    adapter = save_adapter(model.eval(), root / "final", base_model_name_or_path=str(base))
    write_tokenizer_files(tokenizer, adapter, "v3")  # as the loop's final/ export does
    llm = start_engine(base, enable_lora=True, max_lora_rank=8, max_loras=1)
    yield types.SimpleNamespace(tokenizer=tokenizer, model=model, base_model=base_model, adapter=adapter, base=base,
                                llm=llm)
    close_engine(llm)


def test_lora_adapter_served_on_its_base(adapter_run):
    from vllm.lora.request import LoRARequest

    run, lora = adapter_run, LoRARequest("run", 1, str(adapter_run.adapter))
    texts = run.llm.generate(TEXTS, scoring_params(), lora_request=lora, use_tqdm=False)
    assert_served_as_ours(run.model, run.tokenizer, texts, [run.tokenizer.encode(t, bos=True) for t in TEXTS])
    chats = run.llm.chat(CHATS, scoring_params(), lora_request=lora, use_tqdm=False)
    assert_served_as_ours(run.model, run.tokenizer, chats,
                          [run.tokenizer.apply_chat_template(c, "v3", add_generation_prompt=True) for c in CHATS])
    # the adapter matters: without it the engine serves the base, whose log-probs are far from the adapted ones
    plain = run.llm.generate(TEXTS[:1], scoring_params(), use_tqdm=False)
    assert_served_as_ours(run.base_model, run.tokenizer, plain, [run.tokenizer.encode(TEXTS[0], bos=True)])
    assert float((vllm_prompt_logprobs(plain[0]) - vllm_prompt_logprobs(texts[0])).abs().max()) > 1e-2


def test_merged_folder_in_bf16(adapter_run, tmp_path):
    """merged/ written in bf16 (merge_adapter_folder, the loop's merge_at_end) and served in bf16.

    Tolerance: the exact answer for these bf16 weights is the fp32 forward of them (our model loaded
    in fp32). A bf16 forward rounds every activation to 8 significant bits, so it strays from that
    answer by an amount set by the model and prompt, not by the implementation; our own bf16 forward
    measures it here. vLLM's kernels round at other points (fused ops, fp32 accumulation), so its
    error is of the same order but not equal: it must stay within 4x ours (floor 2e-2 for prompts
    where ours happens to be tiny). A real mismatch (wrong weight, wrong token, missing norm) moves
    log-probs by whole units, far beyond this.
    """
    merged = tmp_path / "merged"
    merge_adapter_folder(adapter_run.adapter, merged, base=str(adapter_run.base), dtype="bfloat16")
    exact = Mistral.from_pretrained(merged, dtype=torch.float32).eval()
    ours_bf16 = Mistral.from_pretrained(merged, dtype=torch.bfloat16).eval()
    tokenizer = adapter_run.tokenizer
    close_engine(None)
    llm = start_engine(merged, dtype="bfloat16")
    try:
        prompts = [tokenizer.encode(t, bos=True) for t in TEXTS]
        text_out = llm.generate(TEXTS, scoring_params(), use_tqdm=False)
        chat_out = llm.chat(CHATS, scoring_params(), use_tqdm=False)
    finally:
        close_engine(llm)
    prompts += [tokenizer.apply_chat_template(c, "v3", add_generation_prompt=True) for c in CHATS]
    for out, ids in zip(text_out + chat_out, prompts, strict=True):
        assert list(out.prompt_token_ids) == ids, first_difference(ids, list(out.prompt_token_ids))
        reference = our_prompt_logprobs(exact, ids)
        ours_err = float((our_prompt_logprobs(ours_bf16, ids) - reference).abs().max())
        vllm_err = float((vllm_prompt_logprobs(out) - reference).abs().max())
        assert vllm_err <= max(4 * ours_err, 2e-2), f"prompt {ids}: vLLM bf16 {vllm_err:.2e}, ours bf16 {ours_err:.2e}"


def test_classification_folder(tmp_path):
    """A sequence-classification folder (score head, pad id set): vLLM's classify runner tokenizes the text as
    we do and gives the softmax of our logits at the last token."""
    tokenizer = bundled("v3")
    model = tiny_model(tokenizer.vocab_size, seed=4, task="sequence_classification", num_labels=3, pad_token_id=0)
    folder = write_full_folder(model, tokenizer, tmp_path / "final", "v3")
    llm = start_engine(folder, runner="pooling")
    try:
        outputs = llm.classify(TEXTS, use_tqdm=False)
    finally:
        close_engine(llm)
    for out, text in zip(outputs, TEXTS, strict=True):
        ids = tokenizer.encode(text, bos=True)
        assert list(out.prompt_token_ids) == ids, first_difference(ids, list(out.prompt_token_ids))
        with torch.no_grad():
            ours = model(torch.tensor([ids])).float().softmax(-1)[0]
        diff = float((torch.tensor(out.outputs.probs) - ours).abs().max())
        assert diff <= FP32_TOL, f"{text!r}: max |probability difference| {diff:.2e}"
