"""Structured outputs: what constrained decoding costs, and the grammar libraries side by side.

    .venv/bin/python bench/structured.py [--jobs 32] [--new-tokens 192] [--rounds 2] [--libraries]

In one run, on one stack (gemma-3-270m on the CPU, greedy): `--jobs` concurrent jobs whose reply
is held to a JSON schema (an array of objects with enums, integers and bounded strings), then
as many jobs without one, each asking for as many tokens as its constrained twin produced (so
both sides decode the same lengths), in alternating rounds. Prints useful tokens/s of each,
the ratio, and the mean mask time per step against the mean step time (the jobs' metrics).

`--libraries`: before the stack, in this process, the grammar libraries that are installed
(llguidance, xgrammar, outlines-core) on Gemma 3's 262k-token tokenizer: building their
tokenizer, compiling the schema, and one token mask, mean over the schema's reply.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.cluster import Cluster  # noqa: E402
from bench.throughput import prompts  # noqa: E402
from core.schemas import TERMINAL_STATUSES  # noqa: E402

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "minItems": 2,
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 24},
                    "kind": {"enum": ["fruit", "vegetable", "grain", "other"]},
                    "grams": {"type": "integer", "minimum": 1, "maximum": 1000},
                },
                "required": ["name", "kind", "grams"],
                "additionalProperties": False,
            },
        },
        "note": {"type": "string", "maxLength": 60},
    },
    "required": ["items", "note"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "basket", "schema": SCHEMA, "strict": True}}
REPLY = (
    '{"items":[{"name":"apple","kind":"fruit","grams":120},{"name":"rice","kind":"grain","grams":500}],'
    '"note":"ok"}'
)


def run_round(
    cluster: Cluster, texts: list[str], limits: list[int], constrained: bool
) -> list[dict[str, Any]]:
    """The texts submitted at once, each with its own max_new_tokens."""
    headers = {"Authorization": f"Bearer {cluster.key}"}
    with httpx.Client(base_url=cluster.url, headers=headers, timeout=600) as client:

        def one(text: str, limit: int) -> dict[str, Any]:
            params: dict[str, Any] = {"max_new_tokens": limit}
            if constrained:
                params["response_format"] = FORMAT
            answer = client.post("/v1/jobs", json={"input": {"prompt": text}, "params": params})
            assert answer.status_code == 202, answer.text
            job_id = answer.json()["id"]
            while True:
                job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}", params={"wait": 60}).json()
                if job["status"] in TERMINAL_STATUSES:
                    return job

        with ThreadPoolExecutor(len(texts)) as pool:
            return list(pool.map(one, texts, limits))


def libraries(tokenizer_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    reply = tokenizer(REPLY, add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")]
    vocab = 262_144
    print(
        f"\ngrammar libraries, Gemma 3's tokenizer ({vocab} tokens), the bench's schema ({len(reply)} tokens)"
    )
    print(
        f"{'library':<14} {'tokenizer s':>12} {'compile ms':>11} {'mask ms/step':>13}  (computed and applied)"
    )
    try:
        import llguidance.hf
        import torch
        from llguidance import LLMatcher

        from core import structured
        from workers.engine.constrain import Constraint

        started = time.perf_counter()
        lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab, eos_token=eos)
        built = time.perf_counter() - started
        grammar = structured.grammar_of(structured.ResponseFormat.model_validate(FORMAT), None, None)
        assert grammar is not None
        started = time.perf_counter()
        matcher = LLMatcher(lltok, grammar, log_level=0, limits=structured.limits())
        compiled = (time.perf_counter() - started) * 1000
        constraint = Constraint(matcher, compiled, eos)  # the mask as the engine applies it
        row = torch.zeros(vocab)
        for token in reply:
            constraint.mask(row)
            constraint.accept(token)
        masks = [constraint.mask_s / constraint.steps]
        print(f"{'llguidance':<14} {built:>12.2f} {compiled:>11.2f} {statistics.mean(masks) * 1000:>13.3f}")
    except ImportError:
        print("llguidance: not installed")
    try:
        import torch

        xgrammar: Any = importlib.import_module("xgrammar")  # not a dependency of gemmaq

        started = time.perf_counter()
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab, stop_token_ids=eos)
        compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
        built = time.perf_counter() - started
        started = time.perf_counter()
        compiled_grammar = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
        compiled = (time.perf_counter() - started) * 1000
        xmatcher = xgrammar.GrammarMatcher(compiled_grammar)
        bitmask = xgrammar.allocate_token_bitmask(1, vocab)
        logits = torch.zeros((1, vocab))
        masks = []
        for token in reply:
            started = time.perf_counter()
            xmatcher.fill_next_token_bitmask(bitmask)
            xgrammar.apply_token_bitmask_inplace(logits, bitmask)
            masks.append(time.perf_counter() - started)
            xmatcher.accept_token(token)
        print(f"{'xgrammar':<14} {built:>12.2f} {compiled:>11.2f} {statistics.mean(masks) * 1000:>13.3f}")
    except ImportError:
        print("xgrammar: not installed (pip install xgrammar; it needs torch and triton)")
    try:
        importlib.import_module("outlines_core")
        print("outlines-core: installed, not measured here")
    except ImportError:
        print("outlines-core: not installed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=192)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--libraries", action="store_true")
    args = parser.parse_args()
    if args.libraries:
        from core.settings import Settings
        from core.variants import load_variants
        from workers.engine.loading import weights_dir

        registry = load_variants(None)
        variant = registry.get("gemma-3-270m")
        assert variant is not None
        libraries(weights_dir(variant, registry, Settings().model_cache))
    texts = [f"{p} A shopping basket, as JSON:" for p in prompts(args.jobs)]
    cluster = Cluster(Path(tempfile.mkdtemp(prefix="gemmaq-bench-")), variants="gemma-3-270m", workers=1,
                      log_level="WARNING")  # fmt: skip
    totals = {False: [0, 0.0], True: [0, 0.0]}
    jobs: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    warm: list[dict[str, Any]] = []
    try:
        print("starting the stack (own PostgreSQL and Redis, API, reconciler, one CPU worker)…", flush=True)
        cluster.start()
        run_round(cluster, texts[:2], [8, 8], False)  # warm the path, and the grammar compiler
        warm = run_round(cluster, texts[:2], [8, 8], True)
        for _ in range(args.rounds):
            # The constrained jobs end when their JSON is complete; the free ones then ask for as
            # many tokens each, so both sides decode the same lengths and join as often.
            lengths: list[int] = []
            for constrained in (True, False):
                limits = [args.new_tokens] * len(texts) if constrained else lengths
                started = time.perf_counter()
                done = run_round(cluster, texts, limits, constrained)
                totals[constrained][1] += time.perf_counter() - started
                assert all(j["status"] == "succeeded" for j in done), [j["error"] for j in done]
                totals[constrained][0] += sum(j["result"]["usage"]["output_tokens"] for j in done)
                jobs[constrained] += done
                lengths = [max(1, j["result"]["usage"]["output_tokens"]) for j in done]
    finally:
        cluster.stop()
    valid = sum(1 for j in jobs[True] if _parses(j["result"]["text"]))
    print(f"\n{args.jobs} concurrent jobs x {args.rounds} rounds each, max_new_tokens {args.new_tokens}:")
    print(f"{'path':<34} {'tokens':>7} {'seconds':>8} {'tokens/s':>9}")
    rate = {}
    for constrained, name in ((False, "without a schema"), (True, "with a JSON schema")):
        tokens, seconds = totals[constrained]
        rate[constrained] = tokens / seconds
        print(f"{name:<34} {tokens:>7} {seconds:>8.2f} {rate[constrained]:>9.1f}")
    masks = [
        j["metrics"]["grammar_mask_ms"] for j in jobs[True] if j["metrics"]["grammar_mask_ms"] is not None
    ]
    steps = [j["metrics"]["inference_ms"] / max(j["result"]["usage"]["output_tokens"], 1) for j in jobs[True]]
    compiles = [j["metrics"]["grammar_compile_ms"] for j in jobs[True]]
    print(f"\nreplies that parse and match the schema: {valid} of {len(jobs[True])}")
    cached = sum(1 for c in compiles if c == 0)
    mask, step = statistics.mean(masks), statistics.mean(steps)
    first = max(j["metrics"]["grammar_compile_ms"] or 0.0 for j in warm)
    print(
        f"grammar compile: {first:.2f} ms in the warm-up; {cached} of {len(compiles)} jobs found it compiled"
    )
    print(f"mask: {mask:.3f} ms per step per row, against a step of {step:.1f} ms")
    print(f"constrained / unconstrained = {rate[True] / rate[False]:.2f}x")


def _parses(text: str) -> bool:
    try:
        import jsonschema

        jsonschema.validate(json.loads(text), SCHEMA)
        return True
    except Exception:
        return False


if __name__ == "__main__":
    main()
