"""Sample text from a trained checkpoint, printing each character as it is produced:

    python -m qkv.generate --checkpoint out-cpu-small/ckpt.pt --prompt "ROMEO:"
"""

import argparse
import sys

import torch

from qkv.pt.generate import stream
from qkv.train import ConfigError, load_checkpoint, resolve_device


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m qkv.generate",
        description="Continue a prompt with a model trained by python -m qkv.train, "
                    "printing each character as soon as it is sampled.")
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="ckpt.pt written by python -m qkv.train (e.g. out-cpu-small/ckpt.pt)")
    p.add_argument("--prompt", default="\n",
                   help="text to continue; every character must be in the model's vocabulary "
                        "(default: a newline)")
    p.add_argument("--max-new-tokens", type=int, default=500, metavar="N",
                   help="characters to generate at most (default: 500)")
    p.add_argument("--temperature", type=float, default=0.8, metavar="T",
                   help="divide the logits by T before sampling: < 1 safer, > 1 wilder, "
                        "0 greedy (default: 0.8)")
    p.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="sample only among the K most likely characters (default: all)")
    p.add_argument("--top-p", type=float, default=None, metavar="P",
                   help="sample only among the most likely characters whose probabilities "
                        "add up to P (nucleus sampling; default: all)")
    p.add_argument("--seed", type=int, default=None,
                   help="random seed: the same seed gives the same text (default: random)")
    p.add_argument("--no-cache", action="store_true",
                   help="recompute the whole prefix every step instead of using the KV cache "
                        "(same text, slower)")
    p.add_argument("--device", default="cpu",
                   help="cpu, cuda, cuda:N or auto (default: cpu)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        model, tok, _ = load_checkpoint(args.checkpoint, resolve_device(args.device))
        prompt = tok.encode(args.prompt)
        if not prompt:
            raise ConfigError("the prompt is empty; give at least one character")
        tokens = stream(model, prompt, args.max_new_tokens, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p, eos_id=tok.eot_id, seed=args.seed,
                        use_cache=not args.no_cache)
        print(args.prompt, end="", flush=True)
        # bpe: a character's bytes can span tokens, so decode as a stream, not token by token
        pieces = (tok.stream_decode(tokens) if hasattr(tok, "stream_decode")
                  else (tok.decode([token]) for token in tokens))
        for piece in pieces:
            print(piece, end="", flush=True)
        print()
    except (ConfigError, ValueError) as e:  # bad flags or a prompt outside the vocabulary
        print(f"python -m qkv.generate: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
