"""`jaxserve <command> [flags]`: generate, convert, fetch, serve, client, chat, eval,
train-draft. Thin: parse flags, wire objects."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time

from absl import app, flags, logging

from jaxserve.errors import JaxserveError

USAGE = """usage:
  jaxserve generate --prompt TEXT [--chat] [--max_tokens N] [--temperature T] [--seed S] [--json]
                                [--preset NAME] [--kv_cache_dtype auto|int8]
                                [--quantization none|int8|int4|w8a8|gguf] [--quant_group_size N]
                                (int8 with --quant_group_size: group-wise, as GGUF Q8_0)
  jaxserve convert SRC DST [--quantization int8|int4|w8a8|gguf] [--quant_group_size N]
                           [--quant_method rtn|awq] [--quant_calibration FILE]
                                write SRC (.gguf / HF dir / Orbax dir) as an Orbax checkpoint,
                                optionally with quantised weights (they load back as stored)
  jaxserve fetch [NAME]         download and verify a named model (default: the default model)
  jaxserve serve [--host H] [--port P] [--metrics_port M] [--grace_s S] [--max_waiting N]
                 [--preset NAME] [--kv_cache_dtype auto|int8] [--quantization MODE]
                 [--quant_group_size N]
                                serve --model over gRPC until SIGTERM/SIGINT (graceful drain)
  jaxserve client --prompt TEXT [--chat] [--target HOST:PORT] [sampling flags] [--json]
  jaxserve chat [--target HOST:PORT] [--system TEXT] [sampling flags]   interactive, streaming
  jaxserve eval [--model M] [--modes f32,bf16,int8,...] [--windows N] [--window T] [--out JSON]
                                quantisation quality vs f32 on the Brown corpus (perplexity,
                                KL divergence, top-1 agreement, delta-p; llama-perplexity style)
  jaxserve train-draft --method medusa|eagle --out DIR [--model M] [--steps N] [--lr LR]
                       [--corpus_tokens N] [--num_prompts N] [--num_heads K] [--results JSON]
                                train draft heads on the model's own continuations of
                                configs/draft/prompts.json; use them with --speculative_method
                                medusa|eagle --speculative_model DIR
"""

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "Model name under configs/models/, .gguf file, HF directory "
                    "or Orbax checkpoint. Default: the default model.")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"], "Compute dtype.")
flags.DEFINE_string("preset", None, "Serving preset, a name under configs/serve/ (serve, "
                    "generate): EngineConfig settings over the model's; flags given override it.")
flags.DEFINE_enum("kv_cache_dtype", "auto", ["auto", "int8"], "KV cache storage (generate, "
                  "serve): auto (the compute dtype) or int8 (per-token, per-head scales).")
QUANTIZATION_CHOICES = ("none", "int8", "int4", "w8a8", "gguf")
flags.DEFINE_string("quantization", "none", "Weight quantisation (generate, serve, convert): "
                    "none, int8 (per output channel; group-wise with --quant_group_size), "
                    "int4 (group-wise, --quant_group_size, default 128), w8a8 (int8 weights "
                    "and activations, per channel) or gguf (keep a GGUF file's "
                    "Q8_0/Q4_0/Q4_1 blocks).")
flags.DEFINE_integer("quant_group_size", None, "Group size (32, 64 or 128) of int4 (unset: "
                     "128) or int8 (unset: per output channel).")
flags.DEFINE_enum("quant_method", "rtn", ["rtn", "awq"], "How --quantization int8/int4/w8a8 "
                  "rounds: rtn (round to nearest) or awq (activation-aware scales searched on "
                  "--quant_calibration text).")
flags.DEFINE_string("quant_calibration", None, "AWQ calibration text file (default: a Brown "
                    "corpus slice the quality benchmark does not score).")
flags.register_validator(
    "quantization", lambda v: v is None or v.strip().lower() in ("", *QUANTIZATION_CHOICES),
    message=f"--quantization must be one of {', '.join(QUANTIZATION_CHOICES)}")
flags.register_validator("quant_group_size", lambda v: v is None or v in (32, 64, 128),
                         message="--quant_group_size must be one of 32, 64, 128")
flags.DEFINE_string("speculative_method", "none",
                  "Speculative decoding (generate, serve): ngram (prompt lookup), draft_model "
                  "(--speculative_model, or the model itself with --speculative_quantization / "
                  "--speculative_num_layers), or medusa / eagle heads (--speculative_model: "
                  "what train-draft wrote). Output is unchanged; only speed.")
flags.DEFINE_integer("num_speculative_tokens", 4, "Most drafts verified per step (1-16).",
                     lower_bound=1, upper_bound=16)
flags.DEFINE_string("speculative_model", None, "Draft model (as --model) for draft_model; "
                    "the heads' directory (jaxserve train-draft --out) for medusa / eagle.")
flags.DEFINE_string("speculative_quantization", None, "Quantise the draft (int8, int4, w8a8, "
                    "gguf): with no --speculative_model, a quantised self-draft.")
flags.DEFINE_integer("speculative_num_layers", None, "Cut the draft to its first N layers.",
                     lower_bound=1)
flags.DEFINE_bool("speculative_draft_sampling", False, "draft_model: sample drafts (verified "
                  "by rejection sampling) instead of taking the draft's argmax.")
flags.DEFINE_string("prompt", None, "Prompt text (generate, client).")
flags.DEFINE_bool("chat", False, "Wrap --prompt as a user message in the chat template.")
flags.DEFINE_string("system", None, "System message (with --chat).")
flags.DEFINE_integer("max_tokens", 64, "Maximum tokens to generate.", lower_bound=1)
flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 is greedy.", lower_bound=0.0)
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass, in (0, 1].")
flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens; 0 disables.", lower_bound=-1)
flags.DEFINE_float("min_p", 0.0, "Drop tokens below min_p * p(max).")
flags.DEFINE_float("repetition_penalty", 1.0, "Repetition penalty (> 0; 1 disables).")
flags.DEFINE_integer("seed", None, "Sampling seed: same seed, same tokens.", lower_bound=0)
flags.DEFINE_integer("logprobs", None, "Report logprobs with this many top alternatives.")
flags.DEFINE_multi_string("stop", [], "Stop string (repeatable).")
flags.DEFINE_bool("ignore_eos", False, "Keep generating past end-of-sequence tokens.")
flags.DEFINE_bool("json", False, "Print one JSON object instead of plain text.")
flags.DEFINE_string("host", "127.0.0.1", "Address to serve on (serve).")
flags.DEFINE_integer("port", 50051, "gRPC port to serve on (serve); 0 picks a free one.",
                     lower_bound=0)
flags.DEFINE_integer("metrics_port", None, "Prometheus /metrics HTTP port (serve); unset: off.",
                     lower_bound=0)
flags.DEFINE_float("grace_s", 30.0, "Drain grace period for in-flight requests on SIGTERM "
                   "(serve).", lower_bound=0.0)
flags.DEFINE_integer("max_waiting", None, "Bound of the waiting queue; beyond it requests get "
                     "RESOURCE_EXHAUSTED (serve). Unset: the engine's default.", lower_bound=1)
flags.DEFINE_enum("scheduler", "continuous", ["continuous", "static"],
                  "serve: continuous batching, or static batches run to completion (baseline).")
flags.DEFINE_string("sample_prompt", None, "serve: once healthy, send this chat prompt over "
                    "gRPC and print the answer, then keep serving.")
flags.DEFINE_string("target", "127.0.0.1:50051", "Server address (client, chat).")
flags.DEFINE_float("timeout", None, "Per-request deadline in seconds (client, chat).")
flags.DEFINE_string("modes", None, "eval: comma-separated quality modes (f32, bf16, int8, "
                    "int8-g32, int8-g64, int8-g128, int4-g128, int4-g32, gguf, w8a8, kv-int8); "
                    "f32 is the base. Default: all.")
flags.DEFINE_integer("windows", 8, "eval: number of corpus windows to score.", lower_bound=1)
flags.DEFINE_integer("window", 512, "eval: tokens per window (the second half is scored).",
                     lower_bound=32)
flags.DEFINE_string("out", None, "eval: also write the results as JSON to this path; "
                    "train-draft: the directory the heads are written to.")
flags.DEFINE_enum("method", None, ["medusa", "eagle"], "train-draft: which draft heads.")
flags.DEFINE_integer("steps", 300, "train-draft: optimiser steps.", lower_bound=1)
flags.DEFINE_float("lr", None, "train-draft: peak AdamW learning rate (default: medusa 1e-3, "
                   "eagle 5e-4).", lower_bound=0.0)
flags.DEFINE_integer("corpus_tokens", 0, "train-draft: also distil over this many tokens of the "
                     "evaluation corpus (Brown; fetched once), in 256-token sequences.",
                     lower_bound=0)
flags.DEFINE_integer("num_prompts", None, "train-draft: use the first N training prompts "
                     "(default: all).", lower_bound=1)
flags.DEFINE_integer("num_heads", 4, "train-draft: Medusa heads.", lower_bound=1, upper_bound=16)
flags.DEFINE_string("results", None, "train-draft: also write loss curve, acceptance and the "
                    "machine as JSON to this path.")
flags.register_validator("top_p", lambda v: 0.0 < v <= 1.0, message="--top_p must be in (0, 1]")


QUANT_FLAGS = ("quantization", "quant_group_size", "quant_method", "quant_calibration")
ENGINE_FLAGS = ("kv_cache_dtype", *QUANT_FLAGS)
SPEC_FLAGS = ("speculative_method", "num_speculative_tokens", "speculative_model",
              "speculative_quantization", "speculative_num_layers", "speculative_draft_sampling")
SAMPLING_FLAGS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                  "seed", "logprobs", "stop", "ignore_eos")
# The flags each command takes; any other of this module's flags is a usage error there.
COMMAND_FLAGS = {
    "generate": ("model", "dtype", "preset", *ENGINE_FLAGS, *SPEC_FLAGS, "prompt", "chat",
                 "system", *SAMPLING_FLAGS, "json"),
    "convert": ("dtype", *QUANT_FLAGS),
    "fetch": (),
    "serve": ("model", "dtype", "preset", *ENGINE_FLAGS, *SPEC_FLAGS, "host", "port",
              "metrics_port", "grace_s", "max_waiting", "scheduler", "sample_prompt"),
    "client": ("target", "prompt", "chat", "system", *SAMPLING_FLAGS, "json", "timeout"),
    "chat": ("target", "system", *SAMPLING_FLAGS, "timeout"),
    "eval": ("model", "modes", "windows", "window", "out"),
    "train-draft": ("model", "method", "out", "steps", "lr", "corpus_tokens", "num_prompts",
                    "num_heads", "num_speculative_tokens", "results"),
}
HELP_ARGS = ("-h", "--help", "-help", "--helpshort", "-?")


def _quantization() -> str | None:
    """--quantization as an EngineConfig value: "none" or empty -> None."""
    q = (FLAGS.quantization or "").strip().lower()
    return None if q in ("", "none") else q


def _engine_overrides(names: tuple[str, ...] = ENGINE_FLAGS) -> dict:
    """The EngineConfig flags among `names` given on the command line, as EngineConfig values.
    Flags left unset are not passed, so they keep what the model or --preset sets (and else
    the EngineConfig defaults, which are the flags' defaults)."""
    out = {name: FLAGS[name].value for name in names if FLAGS[name].present}
    if "quantization" in out:
        out["quantization"] = _quantization()
    return out


def _spec_overrides() -> dict:
    if FLAGS.speculative_method == "none":
        return {}
    q = (FLAGS.speculative_quantization or "").strip().lower()
    return {"speculative_method": FLAGS.speculative_method,
            "num_speculative_tokens": FLAGS.num_speculative_tokens,
            "speculative_model": FLAGS.speculative_model,
            "speculative_quantization": None if q in ("", "none") else q,
            "speculative_num_layers": FLAGS.speculative_num_layers,
            "speculative_draft_sampling": FLAGS.speculative_draft_sampling}


def _generate(args: list[str]) -> int:
    if args:
        raise app.UsageError(f"generate takes no positional arguments, got {args}")
    if not FLAGS.prompt:
        raise app.UsageError("generate needs a non-empty --prompt")
    from jaxserve import LLM, SamplingParams

    params = SamplingParams(
        temperature=FLAGS.temperature, top_p=FLAGS.top_p, top_k=FLAGS.top_k, min_p=FLAGS.min_p,
        repetition_penalty=FLAGS.repetition_penalty, seed=FLAGS.seed,
        max_tokens=FLAGS.max_tokens, logprobs=FLAGS.logprobs, stop=FLAGS.stop or None,
        ignore_eos=FLAGS.ignore_eos)
    t0 = time.perf_counter()
    print(f"loading {FLAGS.model or 'the default model'} (weights, then the first step's "
          f"compile) ...", file=sys.stderr, flush=True)
    llm = LLM(FLAGS.model, dtype=FLAGS.dtype, preset=FLAGS.preset, **_engine_overrides(),
              **_spec_overrides())
    load_s = time.perf_counter() - t0
    if FLAGS.chat:
        messages = ([{"role": "system", "content": FLAGS.system}] if FLAGS.system else [])
        prompt = llm.encode_chat(messages + [{"role": "user", "content": FLAGS.prompt}])
    else:
        prompt = llm.tokenizer.encode(FLAGS.prompt)
    # The server's length rule: max_tokens past the context is an error, not a silent cap.
    eng = llm.engine
    seq = eng.make_sequence(prompt, params, strict_length=True)
    t0 = time.perf_counter()
    eng.add_sequence(seq)
    shown = 0
    while eng.has_unfinished():
        eng.step()
        if not FLAGS.json:  # stream what can no longer change (no held-back stop string)
            end = len(seq.text) if seq.is_finished else seq.stop_checker.emittable_len(seq.text)
            if end > shown:
                sys.stdout.write(seq.text[shown:end])
                sys.stdout.flush()
                shown = end
    gen_s = time.perf_counter() - t0
    out = eng.output(seq)
    if FLAGS.json:
        print(json.dumps({
            "text": out.text, "token_ids": out.token_ids, "finish_reason": out.finish_reason,
            "prompt_tokens": len(out.prompt_token_ids),
            "logprobs": out.logprobs, "load_s": round(load_s, 3), "generate_s": round(gen_s, 3),
            "spec_proposed": out.num_spec_proposed, "spec_accepted": out.num_spec_accepted,
        }))
    else:
        print()
        print(f"[{len(out.token_ids)} tokens, finish_reason={out.finish_reason}, "
              f"load {load_s:.1f}s, generate {gen_s:.1f}s]", file=sys.stderr)
    if out.finish_reason not in ("stop", "length"):
        print(f"error: the request ended with {out.finish_reason}: {out.error}", file=sys.stderr)
        return 2
    return 0


def _sampling_flags() -> dict:
    """Sampling flags as Client keyword arguments; unset ones keep the server's defaults."""
    return dict(temperature=FLAGS.temperature, top_p=FLAGS.top_p, top_k=FLAGS.top_k,
                min_p=FLAGS.min_p, repetition_penalty=FLAGS.repetition_penalty, seed=FLAGS.seed,
                max_tokens=FLAGS.max_tokens, logprobs=FLAGS.logprobs, stop=FLAGS.stop or None,
                ignore_eos=FLAGS.ignore_eos)


def _serve(args: list[str]) -> int:
    if args:
        raise app.UsageError(f"serve takes no positional arguments, got {args}")
    from jaxserve.server.commands import run_serve

    return run_serve(FLAGS.model, dtype=FLAGS.dtype, host=FLAGS.host, port=FLAGS.port,
                     metrics_port=FLAGS.metrics_port, grace_s=FLAGS.grace_s,
                     max_waiting=FLAGS.max_waiting, scheduler=FLAGS.scheduler,
                     sample_prompt=FLAGS.sample_prompt, preset=FLAGS.preset,
                     engine_overrides={**_engine_overrides(), **_spec_overrides()})


def _client(args: list[str]) -> int:
    if args:
        raise app.UsageError(f"client takes no positional arguments, got {args}")
    if not FLAGS.prompt:
        raise app.UsageError("client needs a non-empty --prompt")
    from jaxserve.server.commands import run_client

    return run_client(FLAGS.target, prompt=FLAGS.prompt, chat=FLAGS.chat, system=FLAGS.system,
                      sampling=_sampling_flags(), json_output=FLAGS.json, timeout=FLAGS.timeout)


def _chat(args: list[str]) -> int:
    if args:
        raise app.UsageError(f"chat takes no positional arguments, got {args}")
    from jaxserve.server.commands import run_chat

    return run_chat(FLAGS.target, system=FLAGS.system, sampling=_sampling_flags(),
                    timeout=FLAGS.timeout)


def _convert(args: list[str]) -> int:
    if len(args) != 2:
        raise app.UsageError("convert needs exactly two arguments: SRC DST")
    from jaxserve.config import EngineConfig
    from jaxserve.errors import ConfigError
    from jaxserve.loading import load_checkpoint
    from jaxserve.loading.corpus import calibration_text
    from jaxserve.loading.orbax_ckpt import save_orbax
    from jaxserve.model import quant
    from jaxserve.model.awq import calibration_tokens
    from jaxserve.tokenizer import load_tokenizer

    src, dst = args
    ecfg = EngineConfig(**_engine_overrides(QUANT_FLAGS))  # validates the combination
    tokenizer = load_tokenizer(src)
    calibration = (calibration_tokens(tokenizer, calibration_text(ecfg.quant_calibration))
                   if ecfg.quant_method == "awq" else None)
    try:
        cfg, params = load_checkpoint(src, dtype=FLAGS.dtype or "float32",
                                      quantization=ecfg.quantization,
                                      group_size=ecfg.quant_group_size,
                                      calibration_tokens=calibration)
    except ValueError as e:  # a group size fitting none of this model's dimensions
        raise ConfigError(str(e)) from None
    save_orbax(dst, cfg, params, tokenizer=tokenizer)
    mode = quant.tree_mode(params)
    print(f"wrote Orbax checkpoint {dst}" + (f" (weights {mode})" if mode else ""))
    return 0


def _fetch(args: list[str]) -> int:
    if len(args) > 1:
        raise app.UsageError("fetch takes at most one model name")
    from jaxserve.config import DEFAULT_MODEL
    from jaxserve.loading.fetch import fetch_model

    print(fetch_model(args[0] if args else DEFAULT_MODEL))
    return 0


def _eval(args: list[str]) -> int:
    if args:
        raise app.UsageError(f"eval takes no positional arguments, got {args}")
    from jaxserve import evaluation
    from jaxserve.machine import describe_machine

    modes = evaluation.parse_modes(FLAGS.modes or evaluation.DEFAULT_MODES)  # before any load
    result = evaluation.run_quality(FLAGS.model, modes, windows=FLAGS.windows,
                                    window=FLAGS.window,
                                    progress=lambda m: print(m, file=sys.stderr, flush=True))
    result["machine"] = describe_machine()
    if FLAGS.out:
        print(f"wrote {evaluation.write_result(result, FLAGS.out)}", file=sys.stderr)
    print(evaluation.format_table(result))
    return 0


def _train_draft(args: list[str]) -> int:
    if args:
        raise app.UsageError(f"train-draft takes no positional arguments, got {args}")
    if not FLAGS.method or not FLAGS.out:
        raise app.UsageError("train-draft needs --method medusa|eagle and --out DIR")
    from jaxserve.machine import describe_machine
    from jaxserve.speculative.train import train_draft

    load_before = os.getloadavg()  # the CPU is often shared: say how busy it was
    result = train_draft(FLAGS.method, FLAGS.out, model=FLAGS.model, steps=FLAGS.steps,
                         lr=FLAGS.lr, num_prompts=FLAGS.num_prompts, num_heads=FLAGS.num_heads,
                         num_speculative_tokens=FLAGS.num_speculative_tokens,
                         corpus_tokens=FLAGS.corpus_tokens,
                         log=lambda m: print(m, file=sys.stderr, flush=True))
    result["machine"] = describe_machine()
    result["load_average_1m_5m_15m"] = {"start": [round(x, 2) for x in load_before],
                                        "end": [round(x, 2) for x in os.getloadavg()]}
    if FLAGS.results:
        with open(FLAGS.results, "w") as f:
            f.write(json.dumps(result, indent=1) + "\n")
        print(f"wrote {FLAGS.results}", file=sys.stderr)
    a, loss = result["acceptance"], result["loss_curve"][-1]["loss"]
    print(f"{FLAGS.method} heads in {FLAGS.out}: final loss {loss:.4f}, "
          f"held-out mean accepted drafts {a['mean_accepted_drafts']} of "
          f"{a['num_speculative_tokens']} ({a['mean_tokens_per_step']} tokens per step), "
          f"output equals plain: {a['equals_plain']}; {result['time_s']['total']:.0f} s")
    return 0


COMMANDS = {"generate": _generate, "convert": _convert, "fetch": _fetch, "serve": _serve,
            "client": _client, "chat": _chat, "eval": _eval, "train-draft": _train_draft}


def command_help(command: str) -> str:
    """`jaxserve COMMAND --help`: the command's usage lines and only its flags."""
    lines = USAGE.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"  jaxserve {command}"))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("  jaxserve ")),
               len(lines))
    out = ["usage:", *lines[start:end], "", "flags:"]
    for name in COMMAND_FLAGS[command]:
        f = FLAGS[name]
        default = "" if f.default is None or f.default == [] else f" (default: {f.default})"
        text = f.help.split(";\n")[0]  # absl appends its own note to a multi-flag's help
        out.append(textwrap.fill(f"--{name}: {text}{default}", width=96,
                                 initial_indent="  ", subsequent_indent="      "))
    if not COMMAND_FLAGS[command]:
        out.append("  (none)")
    return "\n".join(out)


def _foreign_flags(command: str) -> list[str]:
    """This module's flags given on the command line that `command` does not take."""
    ours = {f.name for f in FLAGS.get_flags_for_module(__name__)}
    return sorted(n for n in ours - set(COMMAND_FLAGS[command]) if FLAGS[n].present)


def main(argv: list[str]) -> int:
    try:
        return _main(argv)
    except app.UsageError as e:  # absl would print every flag of every command after it
        print(f"usage error: {e}", file=sys.stderr)
        return 1


def _main(argv: list[str]) -> int:
    logging.set_verbosity(logging.WARNING)  # jax's backend probing logs at INFO
    if len(argv) < 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"unknown or missing command\n{USAGE}")
    foreign = _foreign_flags(argv[1])
    if foreign:
        raise app.UsageError(f"{argv[1]} does not take {', '.join('--' + n for n in foreign)} "
                             f"(see jaxserve {argv[1]} --help)")
    try:
        return COMMANDS[argv[1]](argv[2:])
    except JaxserveError as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


def run() -> None:
    """Exit codes: 0 done, 1 usage error (a bad or foreign flag, a missing argument), 2 a
    request, model or checkpoint error (JaxserveError). --help, with or without a command,
    prints that command's flags (or the command list) and exits 0."""
    args = sys.argv[1:]
    if any(a in HELP_ARGS for a in args):
        command = next((a for a in args if a in COMMANDS), None)
        print(command_help(command) if command else USAGE.rstrip() +
              "\n\n`jaxserve COMMAND --help` lists a command's flags.")
        sys.exit(0)
    app.run(main)


if __name__ == "__main__":
    run()
