"""A terminal chat with an exported amp-edge package (a pruned Phi, or any package), on ONNX Runtime alone.

    python examples/phi_chat/chat.py PACKAGE                       # interactive; keeps the conversation
    python examples/phi_chat/chat.py PACKAGE --prompt "Hi" --max-new-tokens 64   # one answer, then exit

Run-time imports: onnxruntime, numpy, tokenizers, and jinja2 when the package has a chat template, plus
runtime_bench/generate.py (torch-free; copy the runtime_bench folder next to this file on a device). No torch, no
transformers. Tokens are greedy (what `amp-edge export` validates against PyTorch) and printed as they come.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

try:
    import numpy as np
    from tokenizers import Tokenizer

    from amp_edge_runtime.decoder import OnnxDecoder
    from amp_edge_runtime.errors import PackageError, ProviderError
except ImportError as e:  # a device without the runtime: say what to install, not a traceback
    sys.exit(f"error: {e.name} is missing; pip install onnxruntime numpy tokenizers jinja2 "
             "(and copy amp_edge_runtime/ next to chat.py)")

FALLBACK = "User: {}\nAssistant:"  # a package without a chat template gets plain text turns


class ChatError(Exception):
    """Bad input: printed as one line, exit code 2."""


class ChatPackage:
    """What the app needs from a package folder: the decoder, the tokenizer, the chat template, the stop tokens."""

    def __init__(self, folder: str | Path, provider: str = "cpu"):
        folder = Path(folder)
        if not (folder / "model.onnx").is_file():
            what = "does not exist" if not folder.exists() else "is not an exported package (no model.onnx)"
            raise ChatError(f"{folder} {what}; make one with: amp-edge export MODEL --ratio 0.3 --out {folder}")
        if not (folder / "tokenizer.json").is_file():
            raise ChatError(f"{folder} has no tokenizer.json; re-export it with amp-edge export, which copies the tokenizer")
        try:
            self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # tokenizers raises a bare Exception for unreadable files
            raise ChatError(f"cannot read {folder / 'tokenizer.json'}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        tok_config = _read_json(folder / "tokenizer_config.json")
        self.template = _chat_template(folder, tok_config)
        self.special = {k: _token_text(tok_config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        config = _read_json(folder / "config.json")
        # stop at every EOS id either config names (Phi-3 lists several: <|endoftext|>, <|assistant|>, <|end|>)
        self.eos = sorted({i for f in ("generation_config.json", "config.json") for i in _ids(_read_json(folder / f).get("eos_token_id"))})
        self.context = config.get("max_position_embeddings")
        try:
            self.decoder = OnnxDecoder(folder, provider=provider)
        except (PackageError, ProviderError) as e:
            raise ChatError(str(e)) from None

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The conversation as the model was trained to see it, with the assistant's turn opened."""
        if self.template is None:
            text = "\n".join(FALLBACK.format(m["content"]) + (" " + a["content"] if a else "")
                             for m, a in zip(messages[::2], messages[1::2] + [None]))
            return self.tokenizer.encode(text).ids
        # the template writes the special tokens itself, as transformers' apply_chat_template(tokenize=True) does
        return self.tokenizer.encode(render(self.template, messages, self.special), add_special_tokens=False).ids

    def reply(self, ids: list[int], max_new_tokens: int, write=None) -> list[int]:
        """Greedy tokens after ``ids`` (the stop token included, if one came); ``write`` gets text as it is decoded."""
        budget = min(max_new_tokens, self.context - len(ids)) if self.context else max_new_tokens
        if budget < 1:
            raise ChatError(f"the prompt ({len(ids)} tokens) fills the model's context of {self.context} tokens")
        new: list[int] = []
        shown = ""
        for token in self.decoder.stream(np.array([ids], dtype=np.int64), budget, eos_token_ids=self.eos):
            new.append(int(token[0]))
            if new[-1] in self.eos:
                break
            if write:
                text = self.tokenizer.decode(new, skip_special_tokens=True)
                if not text.endswith("\ufffd"):  # U+FFFD: half a UTF-8 character, wait for the rest
                    write(text[len(shown):])
                    shown = text
        return new

    def text(self, ids: list[int]) -> str:
        return self.tokenizer.decode([i for i in ids if i not in self.eos], skip_special_tokens=True)


def render(template: str, messages: list[dict], special: dict) -> str:
    """Jinja rendering with the settings transformers uses for chat templates (sandboxed, trimmed blocks)."""
    try:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ChatError("this package has a chat template, which needs jinja2: pip install jinja2") from None

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: __import__("datetime").datetime.now().strftime(fmt))
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=True, **special)
    except TemplateError as e:
        raise ChatError(f"the package's chat template failed: {e}") from None


def _chat_template(folder: Path, tok_config: dict) -> str | None:
    # transformers >= 4.43 saves it as chat_template.jinja, which wins over tokenizer_config.json as it does there
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    template = tok_config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template or None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ChatError(f"{path} is not valid JSON: {e}") from None
    return data if isinstance(data, dict) else {}


def _ids(value) -> list[int]:
    return [value] if isinstance(value, int) else [i for i in value or [] if isinstance(i, int)]


def _token_text(token) -> str | None:
    return token.get("content") if isinstance(token, dict) else token  # AddedToken serialized as a dict


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def chat_once(pkg: ChatPackage, prompt: str, max_new_tokens: int, as_json: bool) -> None:
    ids = pkg.prompt_ids([{"role": "user", "content": prompt}])
    new = pkg.reply(ids, max_new_tokens, None if as_json else _write)
    if as_json:  # for scripts and tests: the exact token ids
        print(json.dumps({"prompt_ids": ids, "new_ids": new, "text": pkg.text(new)}))
    else:
        print()


def chat_loop(pkg: ChatPackage, max_new_tokens: int) -> None:
    print(f"chatting with {pkg.decoder.path.parent} (Ctrl-D to quit)")
    messages: list[dict] = []
    while True:
        try:
            prompt = input("> ").strip()
        except EOFError:
            print()
            return
        if not prompt:
            continue
        messages.append({"role": "user", "content": prompt})
        ids = pkg.prompt_ids(messages)
        while pkg.context and len(ids) + 1 > pkg.context and len(messages) > 1:
            messages = messages[2:]  # forget the oldest exchange so the conversation fits the context
            ids = pkg.prompt_ids(messages)
        try:
            new = pkg.reply(ids, max_new_tokens, _write)
        except ChatError as e:  # this message alone is too long: say so and keep the session
            print(f"error: {e}", file=sys.stderr)
            messages.pop()
            continue
        print()
        messages.append({"role": "assistant", "content": pkg.text(new)})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Chat with an exported amp-edge package on ONNX Runtime.")
    p.add_argument("package", help="package folder made by amp-edge export")
    p.add_argument("--prompt", help="answer this once and exit (otherwise: an interactive chat)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens per answer at most (default 256)")
    p.add_argument("--json", action="store_true", help="with --prompt: print the token ids and text as one JSON object")
    p.add_argument("--provider", default="cpu", help="cpu | cuda | openvino | webgpu (see amp_edge_runtime/providers.py)")
    args = p.parse_args(argv)
    try:
        if args.max_new_tokens < 1:
            raise ChatError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
        if args.prompt is not None and not args.prompt.strip():
            raise ChatError("the prompt is empty; pass some text with --prompt")
        pkg = ChatPackage(args.package, args.provider)
        if args.prompt is not None:
            chat_once(pkg, args.prompt, args.max_new_tokens, args.json)
        else:
            chat_loop(pkg, args.max_new_tokens)
    except ChatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C, mid-answer or at the prompt: end the line, no traceback
        print()
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
