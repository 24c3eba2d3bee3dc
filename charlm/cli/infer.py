"""The commands that run a trained model on text: ``sample``, ``perplexity`` and ``score``."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.text import Text

from charlm import jsonio
from charlm.cli.output import SafeTable, console, err, handled, usage_error, write_text
from charlm.config import SampleConfig, brief, check_precision


def sample(
    ctx: typer.Context,
    checkpoint: Annotated[Optional[Path], typer.Option(help="A .safetensors file or a run folder. Default: the newest run under checkpoints/.")] = None,
    temperature: Annotated[float, typer.Option(help="Sampling temperature; 0 = always the most likely token.")] = 0.8,
    top_k: Annotated[Optional[int], typer.Option(help="Sample only from the K most likely tokens.")] = None,
    top_p: Annotated[Optional[float], typer.Option(help="Sample from the smallest set of tokens whose probability reaches P.")] = None,
    prime: Annotated[str, typer.Option(help="Text to start from (printed first).")] = "",
    prime_file: Annotated[Optional[Path], typer.Option(help="Read the prime text from a file.")] = None,
    length: Annotated[int, typer.Option(help="Tokens to generate (chars, words or bytes).")] = 500,
    num_samples: Annotated[int, typer.Option(help="Independent samples, generated as one batch.")] = 1,
    seed: Annotated[Optional[int], typer.Option(help="Random seed: the same seed gives the same text.")] = None,
    stop: Annotated[Optional[str], typer.Option(help="End a sample at this string (not printed); '<EOS>' ends a word model's line.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "cpu",
    precision: Annotated[str, typer.Option(help="auto, fp32 or bf16 for the matmuls of each step. auto is fp32 (exact); bf16 is faster for many --num-samples on hardware with fast bf16, its log-probabilities within ~0.1 of fp32's.")] = "auto",
    beam: Annotated[Optional[int], typer.Option(help="Beam search: the most likely text of --length tokens that N hypotheses find (1 = always the most likely token), printed once found; the sampling options do not apply.")] = None,
) -> None:
    """Generate text from a trained model, streamed to stdout as it is produced.

    Example: charlm sample --prime "ROMEO:" --temperature 0.7 --length 300 --seed 1
    """
    with handled():
        # Imported when the command runs, so that `charlm --help` loads neither torch nor numpy.
        from charlm.api import load
        from charlm.data.text import read_corpus

        SampleConfig(temperature=temperature, top_k=top_k, top_p=top_p, length=length, num_samples=num_samples,
                     seed=seed, stop=stop)  # checks every option before the model is loaded
        check_precision(precision)
        if prime_file is not None:
            if prime:
                raise usage_error("give --prime or --prime-file, not both")
            prime = read_corpus(prime_file)
        if beam is not None:  # a sampling option given with it is refused, not ignored
            sources = {name: ctx.get_parameter_source(name) for name in ("temperature", "top_k", "top_p", "seed",
                                                                         "stop", "num_samples")}
            given = [f"--{name.replace('_', '-')}" for name, source in sources.items()
                     if source is not None and source.name != "DEFAULT"]
            if given:
                raise usage_error(f"--beam picks the most likely text, it does not sample: {', '.join(given)} cannot be "
                             f"given with it")
        lm = load(checkpoint, device=device)
        if lm.tokenizer.kind == "word" and (unknown := lm.tokenizer.unknown_symbols(prime)):
            err.print(f"charlm: warning: {len(unknown)} prime word(s) not in the vocabulary, read as <UNK>: "
                      f"{' '.join(brief(word) for word in unknown[:8])}", markup=False)
        separate = num_samples > 1
        buffers: list[list[str]] = [[] for _ in range(num_samples)]
        # The library checks the prime and the stop string when the stream is made, so a refused
        # prime is never echoed first.
        pieces = lm.stream(prime, length=length, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                           stop=stop, num_samples=num_samples, precision=precision)
        if separate:
            sys.stdout.write("──── sample 1 ────\n")
        write_text(prime)
        sys.stdout.flush()
        if beam is not None:
            for text in lm.generate(prime, length=length, beam=beam, precision=precision):
                sys.stdout.write(text)
            sys.stdout.write("\n")
            sys.stdout.flush()
            return
        # The first sample streams live; the others are printed whole once generated.
        for piece in pieces:
            if piece.stream == 0:
                write_text(piece.text)
                sys.stdout.flush()
            else:
                buffers[piece.stream].append(piece.text)
        sys.stdout.write("\n")
        for i in range(1, num_samples):
            sys.stdout.write(f"──── sample {i + 1} ────\n")
            write_text(f"{prime}{''.join(buffers[i])}\n")
        sys.stdout.flush()


def perplexity(
    file: Annotated[Path, typer.Argument(help="Held-out UTF-8 text to score.")],
    checkpoint: Annotated[Optional[Path], typer.Option(help="A .safetensors file or a run folder. Default: the newest run.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (for scripts).")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "auto",
    precision: Annotated[str, typer.Option(help="auto or fp32: exact fp32 figures, comparable across machines and with training's validation loss; bf16: faster, within 2e-3 nats/token.")] = "auto",
    encoding_errors: Annotated[str, typer.Option(help="strict, replace or ignore invalid UTF-8.")] = "strict",
    cache: Annotated[bool, typer.Option("--cache/--no-cache", help="Use the cache pointer that training fitted to this checkpoint, if any (the model's distribution mixed with the tokens that followed similar moments of the text's recent past; see 'charlm train --cache'). The model alone's figures are printed beside it. --no-cache: the model alone, in the faster batched pass.")] = True,
    dynamic: Annotated[bool, typer.Option("--dynamic", help="Dynamic evaluation (Krause et al. 2018): a copy of the model adapts to the text as it reads it, one gradient step after scoring each window, decaying towards the trained weights; the checkpoint never changes. The static figures (and the cache pointer's) are printed beside it. Slower: a backward pass per window.")] = False,
    dynamic_lr: Annotated[Optional[float], typer.Option(help="With --dynamic: the rate η, how far each weight moves per step in units of its RMS-normalised gradient (0–1). Default: 0.002.")] = None,
    dynamic_decay: Annotated[Optional[float], typer.Option(help="With --dynamic: the decay λ, the share of the way back to the trained weights each step (0–1). Default: 0.008.")] = None,
    dynamic_window: Annotated[Optional[int], typer.Option(help="With --dynamic: tokens scored between two steps. Default: 5 for word models, 20 for char and byte models.")] = None,
) -> None:
    """Score held-out text: nats/token, perplexity, and bits/char and bits/byte (comparable across char and byte models; a word model's are lower bounds).

    Example: charlm perplexity heldout.txt --checkpoint checkpoints/tinyshakespeare
    """
    with handled():
        # Imported when the command runs, so that `charlm --help` loads neither torch nor numpy.
        from charlm.api import load
        from charlm.data.text import read_corpus

        check_precision(precision)
        text = read_corpus(file, encoding_errors=encoding_errors)
        lm = load(checkpoint, device=device)
        t0 = time.perf_counter()
        result = lm.perplexity(text, precision=precision, cache=cache, dynamic=dynamic, dynamic_lr=dynamic_lr,
                               dynamic_decay=dynamic_decay, dynamic_window=dynamic_window)
        seconds = time.perf_counter() - t0
        report = {"file": str(file), "checkpoint": str(lm.path), "tokenizer": lm.tokenizer.kind, **result.to_dict(),
                  "seconds": seconds}
        if as_json:
            sys.stdout.write(jsonio.dumps(report) + "\n")
            return
        table = SafeTable(show_header=False, box=None)
        for label, value in (("tokens", f"{report['tokens']:,}"), ("characters", f"{report['characters']:,}"),
                             ("<UNK> tokens", f"{report['unknown_tokens']:,}"),
                             ("nats/token", f"{report['nats_per_token']:.4f}"),
                             ("bits/char" + ("*" if result.caveat else ""), f"{report['bits_per_char']:.4f}"),
                             ("bits/byte" + ("*" if result.caveat else ""), f"{report['bits_per_byte']:.4f}"),
                             ("perplexity", f"{report['perplexity']:.3f}")):
            table.add_row(label, value)
        if result.dynamic is not None:
            table.add_row("static (as trained)", f"{result.static_nats_per_token:.4f} nats/token, "
                                                 f"perplexity {result.static_perplexity:.3f}")
            if result.cache is not None:
                table.add_row("static + cache pointer", f"{result.cache_nats_per_token:.4f} nats/token, "
                                                        f"perplexity {result.cache_perplexity:.3f}")
                table.add_row("dynamic + cache pointer", f"{result.dynamic_cache_nats_per_token:.4f} nats/token, "
                                                         f"perplexity {result.dynamic_cache_perplexity:.3f}")
        elif result.cache is not None:
            table.add_row("model alone", f"{result.nats_per_token_without_cache:.4f} nats/token, "
                                         f"perplexity {result.perplexity_without_cache:.3f}")
        console.print(table)
        if result.dynamic is not None:
            d = result.dynamic
            err.print(f"charlm: dynamic evaluation: the model adapted to the text as it read it (rate {d['lr']:g}, "
                      f"decay {d['decay']:g}, a step every {d['window']:,} tokens)"
                      + "; the checkpoint is unchanged", markup=False)
        elif result.cache is not None:
            err.print(f"charlm: with the checkpoint's cache pointer (window {result.cache['window']:,} tokens, "
                      f"θ {result.cache['theta']:g}, λ {result.cache['weight']:g}; --no-cache for the model alone)",
                      markup=False)
        if result.caveat:
            err.print(f"charlm: * {result.caveat}", markup=False)
        if result.unknown_tokens:
            err.print(f"charlm: note: {result.unknown_tokens:,} tokens are not in the model's vocabulary "
                      f"(scored as <UNK>): {' '.join(repr(u) for u in result.unknown[:8])}", markup=False)


def score(
    file: Annotated[Path, typer.Argument(help="UTF-8 text; each line is scored on its own ('-' reads standard input).")],
    checkpoint: Annotated[Optional[Path], typer.Option(help="A .safetensors file or a run folder. Default: the newest run.")] = None,
    sort: Annotated[str, typer.Option(help="input (file order), best (most likely first) or worst.")] = "input",
    top: Annotated[Optional[int], typer.Option(min=1, help="Show only the first N lines after sorting.")] = None,
    include_end: Annotated[bool, typer.Option("--include-end/--no-include-end",
                                              help="Score each line's end (newline, or <EOS> for word models) too.")] = True,
    skip_empty: Annotated[bool, typer.Option("--skip-empty/--keep-empty", help="Leave out empty lines.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (for scripts).")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "auto",
    encoding_errors: Annotated[str, typer.Option(help="strict, replace or ignore invalid UTF-8.")] = "strict",
) -> None:
    """Score each line of FILE alone: nats/token, perplexity and bits/char (lower = more like the training text).

    Every line starts from a fresh state after a newline (<EOS> for word models), as lines do in training.

    Example: charlm score candidates.txt --sort best --top 5
    """
    with handled():
        # Imported when the command runs, so that `charlm --help` loads neither torch nor numpy.
        from charlm.api import LineSelection, score_text
        from charlm.data.text import normalize_newlines, read_corpus

        LineSelection(sort=sort, top=top, skip_empty=skip_empty)  # refused before standard input is read
        if str(file) == "-":
            text = normalize_newlines(sys.stdin.read())
        else:
            text = read_corpus(file, encoding_errors=encoding_errors)
        scored = score_text(text, checkpoint, sort=sort, top=top, include_end=include_end, skip_empty=skip_empty,
                            device=device, name=str(file))
        if as_json:
            sys.stdout.write(jsonio.dumps({"file": str(file), **scored.to_dict()}) + "\n")
            return
        rows = [row.to_dict() for row in scored.lines]
        table = SafeTable(box=None)
        for column in ("line", "perplexity", "nats/token", "bits/char", "tokens", "text"):
            table.add_column(column, justify="left" if column == "text" else "right")
        for row in rows:
            shown = row["text"] if len(row["text"]) <= 60 else row["text"][:59] + "…"
            table.add_row(str(row["line"]), f"{row['perplexity']:.3f}", f"{row['nats_per_token']:.4f}",
                          f"{row['bits_per_char']:.4f}", f"{row['tokens']:,}", Text(shown))
        console.print(table)
        if unknown := sum(r["unknown_tokens"] for r in rows):
            err.print(f"charlm: note: {unknown:,} tokens are not in the model's vocabulary (scored as <UNK>)",
                      markup=False)


