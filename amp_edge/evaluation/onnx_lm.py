"""An lm-eval model backed by an exported ONNX package, run through runtime_bench's ONNX Runtime loop.

Every request is scored with one cache-less forward pass of the package's decoder graph (right-padded batches,
positions 0..n-1), which is what the graph computes at prefill, so the scores are the package's own.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from tqdm.auto import tqdm

from amp_edge.errors import PackageError

DEFAULT_MAX_LENGTH = 2048


def is_onnx_package(source: str | Path) -> bool:
    return Path(source).is_dir() and (Path(source) / "model.onnx").is_file()


def load_package_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        raise PackageError(f"ONNX package {folder} has no tokenizer (tokenizer.json / tokenizer_config.json)")
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise PackageError(f"cannot load the tokenizer of {folder}: {str(e).splitlines()[0]}") from None


class OnnxLM(TemplateLM):
    def __init__(self, package: str | Path, batch_size: int = 4, threads: int | None = None, provider: str = "cpu"):
        super().__init__()
        from amp_edge_runtime.decoder import OnnxDecoder
        from amp_edge_runtime.session import session_options

        self.folder = Path(package)
        self.tokenizer = load_package_tokenizer(self.folder)
        self.decoder = OnnxDecoder(self.folder, options=session_options(threads), provider=provider)
        config = self.folder / "config.json"
        cfg = json.loads(config.read_text()) if config.is_file() else {}
        self.max_length = int(cfg.get("max_position_embeddings") or DEFAULT_MAX_LENGTH)
        self.batch_size = batch_size
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        # The same ids as lm-eval's HF model gets: the tokenizer's own special-token default, and no second BOS
        # when the text already starts with one. PyTorch and ONNX scores are then comparable request by request.
        if add_special_tokens is None:
            bos = self.tokenizer.bos_token
            add_special_tokens = not (bos and string.startswith(bos))
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    def forward(self, rows: list[list[int]]) -> np.ndarray:
        """Logits (batch, longest, vocab) for right-padded rows, in fp32."""
        batch, longest = len(rows), max(len(r) for r in rows)
        ids = np.full((batch, longest), self.pad_id, np.int64)
        mask = np.zeros((batch, longest), np.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
            mask[i, : len(r)] = 1
        positions = np.broadcast_to(np.arange(longest, dtype=np.int64), (batch, longest))
        logits, _ = self.decoder.step(ids, mask, positions, self.decoder.empty_cache(batch))
        return logits.astype(np.float32, copy=False)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        # Requests whose model input is the same (a shared context with one-token continuations, as in BoolQ's
        # "no"/"yes") share one row. Longest rows first: equal lengths share batches, a memory problem shows at once.
        rows: dict[tuple[int, ...], list[int]] = {}
        for i, (_, context, continuation) in enumerate(requests):
            whole = (list(context) + list(continuation))[-(self.max_length + 1):]
            rows.setdefault(tuple(whole[:-1]), []).append(i)
        keys = sorted(rows, key=len, reverse=True)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="loglikelihood (onnx)", disable=disable_tqdm, leave=False)
        for start in range(0, len(keys), self.batch_size):
            chunk = keys[start : start + self.batch_size]
            logits = self.forward([list(k) for k in chunk])
            for key, lg in zip(chunk, logits):
                for i in rows[key]:
                    target = np.asarray(requests[i][2])
                    n, k = len(key), len(target)
                    part = lg[n - k : n]
                    logp = part - _logsumexp(part)
                    score = float(logp[np.arange(k), target].sum())
                    greedy = bool((part.argmax(-1) == target).all())
                    results[i] = (score, greedy)
                    if self.cache_hook is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], (score, greedy))
                bar.update(len(rows[key]))
        bar.close()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for (string,) in tqdm([r.args for r in requests], desc="rolling (onnx)", disable=disable_tqdm, leave=False):
            windows = lm_utils.get_rolling_token_windows(token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                                                         max_seq_len=self.max_length, context_len=1)
            windows = [(None, *lm_utils.make_disjoint_window(w)) for w in windows]
            out.append(sum(score for score, _ in self._loglikelihood_tokens(windows, disable_tqdm=True)))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy generation, one request at a time, stopped at the first of the request's stop strings."""
        out = []
        for context, gen_kwargs in tqdm([r.args for r in requests], desc="generate (onnx)", disable=disable_tqdm, leave=False):
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_gen_toks", 256))
            ids = self.tok_encode(context)[-(self.max_length - max_new):] or [self.prefix_token_id]
            new: list[int] = []
            text = ""
            for token in self.decoder.stream(np.asarray([ids]), max_new, eos_token_ids=[self.eot_token_id]):
                if int(token[0]) == self.eot_token_id:
                    break
                new.append(int(token[0]))
                text = self.tokenizer.decode(new, skip_special_tokens=True)
                if any(s in text for s in until):
                    break
            for s in until:
                text = text.split(s)[0]
            out.append(text)
        return out


def _logsumexp(x: np.ndarray) -> np.ndarray:
    top = x.max(-1, keepdims=True)
    return top + np.log(np.exp(x - top).sum(-1, keepdims=True))
