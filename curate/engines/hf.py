"""The transformers engine: no vLLM needed, and the reference the vLLM engine is tested against."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from curate.engines.base import Answers, EngineSettings, SamplingOptions, stop_ids


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}[dtype]


def attention_implementation(model_dir) -> str | None:
    """`eager` for models with attention-logit soft-capping (Gemma-2): PyTorch's `sdpa`
    kernel has no soft-cap, and transformers would run it anyway, giving log-probabilities
    off by up to 0.2 nats on a tiny Gemma-2 (tests/test_families.py). None: the default."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    config = getattr(config, "text_config", None) or config
    return "eager" if getattr(config, "attn_logit_softcapping", None) else None


def load_causal_lm(model_dir, dtype: str = "auto", device: str | None = None):
    """(model, device, dtype name): the model in eval mode on `device` (CUDA when present)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()  # our own progress bar and summary say enough
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = resolve_dtype(dtype, device)
    implementation = attention_implementation(model_dir)
    options = {"attn_implementation": implementation} if implementation else {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype, **options).to(device).eval()
    return model, device, str(torch_dtype).removeprefix("torch.")


class HFEngine:
    """Scores and generates with a transformers model.

    Scoring batches sequences by a token budget (`max_num_batched_tokens`, default 8192 padded
    tokens a forward pass; longest first, little padding) and computes log-softmax over the
    vocabulary a few positions at a time (`logits_budget` elements, 2**26 float32 = 256 MiB),
    so a 256k vocabulary never needs the full [tokens x vocab] logits in memory. Generation
    runs `max_num_seqs` (default 16) left-padded prompts at a time.
    """

    backend = "hf"

    def __init__(self, model_dir, settings: EngineSettings = EngineSettings(), device: str | None = None,
                 logits_budget: int | None = None):
        from curate.models import load_tokenizer

        model, device, dtype = load_causal_lm(model_dir, settings.dtype, device)
        tokenizer = load_tokenizer(model_dir)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._setup(model, device, dtype, str(model_dir), settings, logits_budget, pad_id,
                    stop_ids(tokenizer, model.generation_config))

    @classmethod
    def from_model(cls, model, settings: EngineSettings = EngineSettings(), pad_id: int = 0,
                   logits_budget: int | None = None) -> HFEngine:
        """An engine around a model already in memory (bench/gpu_score.py's random-weight models)."""
        engine = cls.__new__(cls)
        device = str(next(model.parameters()).device)
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        engine._setup(model.eval(), device, dtype, type(model).__name__, settings, logits_budget, pad_id, [])
        return engine

    def _setup(self, model, device, dtype, model_name, settings, logits_budget, pad_id, stops) -> None:
        self.model, self.device, self.dtype, self.model_name = model, device, dtype, model_name
        self.body = getattr(self.model, self.model.base_model_prefix)
        self.head = self.model.get_output_embeddings()
        self.softcap = getattr(self.model.config, "final_logit_softcapping", None)  # Gemma-2
        self.token_budget = settings.max_num_batched_tokens or 8192
        # Float32 logits of this many elements at a time: 256 MiB on a CPU, 1 GiB on a GPU.
        self.logits_budget = logits_budget or (2**28 if device.startswith("cuda") else 2**26)
        self.batch_size = settings.max_num_seqs or 16
        self.pad_id, self.stop_ids = pad_id, stops

    def score(self, token_ids: Sequence[Sequence[int]]) -> list[np.ndarray]:
        results: list[np.ndarray | None] = [None] * len(token_ids)
        for batch in self._batches(token_ids):
            for index, logprobs in zip(batch, self._score_batch([token_ids[i] for i in batch])):
                results[index] = logprobs
        return results  # type: ignore[return-value]

    def score_groups(self, groups: Sequence[Sequence[Sequence[int]]]) -> list[list[np.ndarray]]:
        """`score` of every sequence of every group, each group's common prefix (say, a
        multiple-choice prompt shared by its options) run through the model once: its keys and
        values (`past_key_values`) are reused by every sequence of the group. Same numbers as
        `score`, up to float rounding; a group of one sequence is scored whole."""
        results: list[list[np.ndarray | None]] = [[None] * len(group) for group in groups]
        shared = [i for i, group in enumerate(groups) if len(group) > 1 and _shared_prefix(group) >= 1]
        whole = set(range(len(groups))) - set(shared)
        single = [(i, j) for i in sorted(whole) for j in range(len(groups[i]))]
        for (i, j), logprobs in zip(single, self.score([groups[i][j] for i, j in single]) if single else []):
            results[i][j] = logprobs
        for batch in self._group_batches([groups[i] for i in shared]):
            members = [shared[k] for k in batch]
            for i, group_logprobs in zip(members, self._score_group_batch([groups[i] for i in members])):
                results[i] = group_logprobs
        return results  # type: ignore[return-value]

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingOptions) -> Answers:
        torch.manual_seed(sampling.seed)
        results = []
        for start in range(0, len(prompts), self.batch_size):
            batch = prompts[start : start + self.batch_size]
            width = max(map(len, batch))
            ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, prompt in enumerate(batch):
                ids[row, width - len(prompt):] = torch.as_tensor(prompt)
                mask[row, width - len(prompt):] = 1
            greedy = sampling.temperature == 0
            with torch.inference_mode():
                out = self.model.generate(
                    input_ids=ids.to(self.device), attention_mask=mask.to(self.device), do_sample=not greedy,
                    temperature=None if greedy else sampling.temperature, top_p=None if greedy else sampling.top_p,
                    top_k=None, max_new_tokens=sampling.max_new_tokens, num_return_sequences=sampling.n,
                    eos_token_id=self.stop_ids, pad_token_id=self.pad_id)
            for row in range(len(batch)):
                results.append([self._trim(out[row * sampling.n + k, width:].tolist()) for k in range(sampling.n)])
        return results

    def close(self) -> None:
        del self.model, self.body, self.head

    def _trim(self, ids: list[int]) -> tuple[list[int], bool]:
        for i, token in enumerate(ids):
            if token in self.stop_ids:
                return ids[:i], True
        return ids, False

    def _batches(self, token_ids: Sequence[Sequence[int]]) -> list[list[int]]:
        order = sorted(range(len(token_ids)), key=lambda i: -len(token_ids[i]))
        batches, current = [], []
        for index in order:
            longest = len(token_ids[current[0]]) if current else len(token_ids[index])
            if current and longest * (len(current) + 1) > self.token_budget:
                batches.append(current)
                current = []
            current.append(index)
        return batches + ([current] if current else [])

    def _group_batches(self, groups: Sequence[Sequence[Sequence[int]]]) -> list[list[int]]:
        """Groups by a budget of padded prefix tokens, longest prefix first."""
        prefix = [_shared_prefix(group) for group in groups]
        order = sorted(range(len(groups)), key=lambda i: -prefix[i])
        batches, current = [], []
        for index in order:
            if current and prefix[current[0]] * (len(current) + 1) > self.token_budget:
                batches.append(current)
                current = []
            current.append(index)
        return batches + ([current] if current else [])

    @torch.inference_mode()
    def _score_group_batch(self, groups: list[Sequence[Sequence[int]]]) -> list[list[np.ndarray]]:
        """One forward pass over the groups' prefixes (right-padded, cached); then the members'
        rests, shortest to longest in passes of about `token_budget` padded tokens, each attending
        to its group's cached prefix (the prefix padding masked out, positions continued)."""
        from transformers import DynamicCache

        prefix_lengths = [_shared_prefix(group) for group in groups]
        ids, mask = right_padded([group[0][:length] for group, length in zip(groups, prefix_lengths)], self.device)
        width = ids.shape[1]
        prefix = self.body(input_ids=ids, attention_mask=mask, use_cache=True)
        hidden, layers = prefix.last_hidden_state, [(layer.keys, layer.values) for layer in prefix.past_key_values.layers]
        predicts = mask[:, 1:].bool()
        flat_prefix = self._token_logprobs(hidden[:, :-1][predicts], ids[:, 1:][predicts]).cpu().numpy()
        prefix_at = np.concatenate([[0], np.cumsum([n - 1 for n in prefix_lengths])])

        members = [(g, k) for g, group in enumerate(groups) for k in range(len(group))]
        rest_of = {(g, k): list(groups[g][k][prefix_lengths[g]:]) for g, k in members}
        members.sort(key=lambda member: len(rest_of[member]))
        results: list[list[np.ndarray | None]] = [[None] * len(group) for group in groups]
        start = 0
        while start < len(members):  # shortest first, so each pass's widest rest sets few pads
            stop = start + 1
            while stop < len(members) and (width + len(rest_of[members[stop]])) * (stop + 1 - start) <= self.token_budget:
                stop += 1
            part = members[start:stop]
            start = stop
            rests = [rest_of[member] for member in part]
            rest_ids, rest_mask = right_padded(rests, self.device)
            rest_width = rest_ids.shape[1]
            index = torch.as_tensor([g for g, _ in part], device=self.device)
            cache = DynamicCache([(keys[index], values[index]) for keys, values in layers])  # its group's prefix, per member
            lengths = torch.as_tensor([prefix_lengths[g] for g, _ in part], device=self.device)
            positions = lengths[:, None] + torch.arange(rest_width, device=self.device)[None, :]
            out = self.body(input_ids=rest_ids, attention_mask=torch.cat([mask[index], rest_mask], dim=1),
                            position_ids=positions, past_key_values=cache, use_cache=True)
            # A rest's first token is predicted by its prefix's last state, the others by the rest's own states.
            states = torch.cat([hidden[index, lengths - 1][:, None], out.last_hidden_state[:, :-1]], dim=1)
            flat_rest = self._token_logprobs(states[rest_mask.bool()], rest_ids[rest_mask.bool()]).cpu().numpy()
            cursor = 0
            for (g, k), rest in zip(part, rests):
                length, sequence = prefix_lengths[g], groups[g][k]
                logprobs = np.full(len(sequence), np.nan, dtype=np.float32)
                logprobs[1:length] = flat_prefix[prefix_at[g] : prefix_at[g + 1]]
                logprobs[length:] = flat_rest[cursor : cursor + len(rest)]
                cursor += len(rest)
                results[g][k] = logprobs
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def _score_batch(self, sequences: list[Sequence[int]]) -> list[np.ndarray]:
        ids, mask = right_padded(sequences, self.device)
        hidden = self.body(input_ids=ids, attention_mask=mask).last_hidden_state
        # Position t predicts token t+1; keep only real (unpadded) predictions.
        predicts = mask[:, 1:].bool()
        states = hidden[:, :-1][predicts]
        targets = ids[:, 1:][predicts]
        flat = self._token_logprobs(states, targets).cpu().numpy()
        out, cursor = [], 0
        for sequence in sequences:
            logprobs = np.full(len(sequence), np.nan, dtype=np.float32)
            logprobs[1:] = flat[cursor : cursor + len(sequence) - 1]
            cursor += len(sequence) - 1
            out.append(logprobs)
        return out

    def _token_logprobs(self, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """ln softmax(head(states))[targets], a chunk of positions at a time, in float32 or better."""
        vocab = self.head.weight.shape[0]
        chunk = max(1, self.logits_budget // vocab)
        pieces = []
        for start in range(0, states.shape[0], chunk):
            logits = self.head(states[start : start + chunk])
            if logits.dtype in (torch.bfloat16, torch.float16):
                logits = logits.float()
            if self.softcap:
                logits = torch.tanh(logits / self.softcap) * self.softcap
            chosen = logits.gather(1, targets[start : start + chunk, None])[:, 0]
            pieces.append(chosen - torch.logsumexp(logits, dim=-1))
        return torch.cat(pieces) if pieces else torch.empty(0)


def right_padded(sequences: Sequence[Sequence[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of `sequences` padded on the right with 0 to the longest, on `device`."""
    width = max(len(s) for s in sequences)
    ids = torch.zeros((len(sequences), width), dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.as_tensor(sequence)
        mask[row, : len(sequence)] = 1
    return ids.to(device), mask.to(device)


def _shared_prefix(group: Sequence[Sequence[int]]) -> int:
    """Tokens every sequence of the group starts with, leaving each at least one token of its own."""
    limit = min(map(len, group)) - 1
    length = 0
    while length < limit and all(sequence[length] == group[0][length] for sequence in group[1:]):
        length += 1
    return length
