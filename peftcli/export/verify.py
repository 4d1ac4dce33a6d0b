"""The export's self-check: llama.cpp loads the written file and must read and answer like peftcli.

Before the file is loaded, peftcli's own model (the merged model in memory, fp32) continues each probe prompt
greedily (`reference_continuations`). Then llama.cpp (llamacpp.py) loads the file (or the base GGUF with the
adapter file on it) and is asked, per probe:

- to tokenize the prompt as rendered: its ids must equal the run's tokenizer's (the vocabulary, merges,
  pre-tokenizer and special tokens written right);
- in chat style, to render the conversation with the file's own chat template: the text must equal the
  run's template's (what llama.cpp's chat endpoints and LM Studio show the model);
- to continue the prompt's ids greedily for as many tokens.

The check fails when llama.cpp warns about the vocabulary while loading, when a tokenization or the
template differs, or when fewer than half of the probes agree on their first `STARTS` tokens. A broken
tensor layout or a wrong hyperparameter derails every continuation at once; quantization moves a few late
tokens, which is why identical whole continuations are printed but not required (q4 types on a 135M model
change some greedy choices; f16 and q8_0 rarely do).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from peftcli.infer.generate import continue_ids
from peftcli.infer.prompt import encode_chat, encode_prompt, render_chat

PROBES = (
    "What is the capital of France?",
    "Give me three tips for travelling on a budget.",
    "Explain what a neural network is in one sentence.",
    "Write a short poem about the sea.",
)
PROBE_TOKENS = 24
STARTS = 8  # tokens that must agree at the start of at least half of the continuations


@dataclass(frozen=True)
class Probe:
    prompt: str
    text: str  # the prompt as rendered (chat template or plain)
    ids: list[int]  # its token ids, by the run's tokenizer
    ours: list[int]  # peftcli's greedy continuation, stop token excluded
    stop: list[int]  # the ids it stops at


@dataclass
class ProbeResult:
    probe: Probe
    theirs: list[int]  # llama.cpp's continuation
    their_ids: list[int]  # llama.cpp's tokenization of probe.text

    @property
    def identical(self) -> bool:
        """The same continuation; llama.cpp's may end on an end-of-generation token of its own (it counts
        more tokens as such than EOS and end-of-turn) where peftcli's goes on through that same token."""
        ours, theirs = self.probe.ours, self.theirs
        return ours == theirs or (len(theirs) < PROBE_TOKENS and ours[: len(theirs)] == theirs)

    def agreeing_tokens(self) -> int:
        n = 0
        for a, b in zip(self.probe.ours, self.theirs, strict=False):
            if a != b:
                break
            n += 1
        return n

    def starts_alike(self) -> bool:
        """The first STARTS tokens agree (or both continuations ended alike before)."""
        k = min(STARTS, max(len(self.probe.ours), len(self.theirs)))
        return self.agreeing_tokens() >= k


@dataclass
class Verification:
    results: list[ProbeResult]
    template_differs: str | None  # the first probe whose chat rendering differs, or None
    vocab_warnings: list[str]
    other_warnings: list[str]

    @property
    def identical(self) -> int:
        return sum(r.identical for r in self.results)

    @property
    def starting_alike(self) -> int:
        return sum(r.starts_alike() for r in self.results)

    def summary(self) -> str:
        n = len(self.results)
        return (
            f"{self.identical}/{n} identical greedy continuations of {PROBE_TOKENS} tokens, "
            f"{self.starting_alike}/{n} agree on their first {STARTS}"
        )

    def failure(self) -> str | None:
        """Why the file fails the check, or None."""
        if self.vocab_warnings:
            return f"llama.cpp warns about the vocabulary: {self.vocab_warnings[0]}"
        for r in self.results:
            if r.their_ids != r.probe.ids:
                counts = f"{len(r.their_ids)} tokens, not {len(r.probe.ids)}"
                return f"llama.cpp tokenizes {r.probe.prompt!r} differently ({counts})"
        if self.template_differs is not None:
            return f"llama.cpp renders the chat template differently (probe {self.template_differs!r})"
        if 2 * self.starting_alike < len(self.results):
            return f"llama.cpp continues the probes differently: {self.summary()}"
        return None


def reference_continuations(
    model, tokenizer, style: str, prompts: tuple[str, ...], stop: list[int], device
) -> list[Probe]:
    """peftcli's greedy continuation of each prompt, rendered in `style` (infer/prompt.py)."""
    probes = []
    for prompt in prompts:
        if style == "chat":
            text = render_chat(tokenizer, [{"role": "user", "content": prompt}])
            ids = encode_chat(tokenizer, [{"role": "user", "content": prompt}])[0]
        else:
            ids = encode_prompt(tokenizer, prompt, style)[0]
            text = tokenizer.decode(ids[0])
        ours = continue_ids(model, tokenizer, ids.to(device), PROBE_TOKENS, stop)
        probes.append(Probe(prompt, text, ids[0].tolist(), ours, stop))
    return probes


def check_with_llamacpp(
    model_path: Path, probes: list[Probe], chat: bool, lora_path: Path | None = None
) -> Verification:
    """Load the file in llama.cpp and compare (module docstring)."""
    from peftcli.export.llamacpp import LlamaCpp

    context = max(len(p.ids) for p in probes) + PROBE_TOKENS + 8
    with LlamaCpp(model_path, lora=lora_path, context=max(context, 256)) as llama:
        warnings = llama.warnings
        results, template_differs = [], None
        for probe in probes:
            if chat and template_differs is None:
                rendered = llama.apply_template([{"role": "user", "content": probe.prompt}])
                if rendered != probe.text:
                    template_differs = probe.prompt
            theirs = llama.greedy(probe.ids, PROBE_TOKENS)
            if theirs and theirs[-1] in probe.stop:  # llama.cpp returns the token it stopped at
                theirs = theirs[:-1]
            results.append(ProbeResult(probe, theirs, llama.tokenize(probe.text)))
    vocab = [w for w in warnings if _about_vocabulary(w)]
    return Verification(results, template_differs, vocab, [w for w in warnings if w not in vocab])


def _about_vocabulary(warning: str) -> bool:
    lowered = warning.lower()
    return lowered.startswith("load:") or any(word in lowered for word in ("token", "vocab"))
