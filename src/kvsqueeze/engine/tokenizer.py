"""The model folder's tokenizer, through the `tokenizers` library (no transformers)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as _Tokenizer

from kvsqueeze.engine.weights import read_json
from kvsqueeze.errors import KVSqueezeError


class Tokenizer:
    """tokenizer.json plus the special tokens named in tokenizer_config.json / generation_config.json."""

    def __init__(self, model_dir: str | Path) -> None:
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.exists():
            raise KVSqueezeError(f"{model_dir} has no tokenizer.json")
        self.tokenizer = _Tokenizer.from_file(str(path))
        tok_cfg = read_json(model_dir / "tokenizer_config.json")
        gen_cfg = read_json(model_dir / "generation_config.json")
        eos = gen_cfg.get("eos_token_id", read_json(model_dir / "config.json").get("eos_token_id"))
        eos_ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
        if not eos_ids and isinstance(tok_cfg.get("eos_token"), str):
            eos_ids = [self.tokenizer.token_to_id(tok_cfg["eos_token"])]
        self.eos_token_ids: tuple[int, ...] = tuple(i for i in eos_ids if i is not None)
        self.chat_template: str | None = tok_cfg.get("chat_template")
        if self.chat_template is None and (model_dir / "chat_template.jinja").exists():
            self.chat_template = (model_dir / "chat_template.jinja").read_text()

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
