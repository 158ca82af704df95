"""bf16 runtime vs fp32 reference along the runtime's own tokens (shared by CPU and GPU tests)."""

import torch

from blockrt.exporter import build_model, get_preset, init_random
from blockrt.exporter.generate import pad_to_block
from blockrt.generation import GenerationConfig
from blockrt.runtime import Model

PROMPTS = [[5, 6, 7, 8, 9], list(range(1, 40)), [3], list(range(100, 121))]


def assert_bf16_tokens_are_reference_top_choices(preset: str, device: str, new_tokens: int = 64, top: int = 5) -> None:
    with torch.device(device):
        reference = build_model(get_preset(preset))
    init_random(reference, seed=3, std=0.1).eval()
    bf16 = build_model(get_preset(preset)).to(device)
    bf16.load_state_dict(reference.state_dict())
    runtime = Model.from_torch(bf16.to(torch.bfloat16), dtype="bf16", max_batch=8, max_context=512, device=device)
    results = runtime.generate(PROMPTS, GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True))
    L = reference.config.block_len
    for prompt, result in zip(PROMPTS, results):
        padded = pad_to_block(prompt, L, reference.config.pad_token_id)
        ids = torch.tensor([padded + result.token_ids], device=device)
        with torch.no_grad():
            if reference.config.kind == "block":
                logits = reference(ids).flatten(1, 2)[0]  # row r predicts token r + L
                start = len(padded) - L
            else:
                logits = reference(ids)[0]  # row r predicts token r + 1
                start = len(padded) - 1
        best = logits[start:start + len(result.token_ids)].topk(top, dim=-1).indices
        chosen = torch.tensor(result.token_ids, device=device)[:, None]
        misses = (best != chosen).all(dim=-1).nonzero().flatten().tolist()
        assert not misses, f"bf16 tokens at {misses} are not among the fp32 reference's top {top}"
