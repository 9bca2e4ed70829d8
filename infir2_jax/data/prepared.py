"""Token shards written by `python -m infir2_jax.prepare`, read back as a record source."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from infir2_jax.data.kinds import DataKind
from infir2_jax.data.records import PREPARED_INFO, DataError, Record


class PreparedSource:
    """Token shards written by `prepare`: records are int32 arrays ([tokens] for CPT,
    [2, length] tokens + loss mask for SFT)."""

    def __init__(self, directory: str | None, kind: DataKind, key: str = "data.path"):
        import grain

        if directory is None:
            raise DataError(f"{key}: required for data.source=prepared")
        info_path = Path(directory) / PREPARED_INFO
        if not info_path.is_file():
            raise DataError(f"{key}: {directory}: no {PREPARED_INFO} (run the prepare command)")
        self.directory = str(directory)
        self.info = json.loads(info_path.read_text())
        if self.info["kind"] != kind.name:
            raise DataError(
                f"{key}: {directory} was prepared for kind={self.info['kind']}, "
                f"not data.kind={kind.name}"
            )
        self.kind = kind
        self.files = [str(Path(directory) / name) for name in self.info["shards"]]
        self._source = grain.sources.ArrayRecordDataSource(self.files)
        if len(self._source) == 0:
            raise DataError(f"{directory}: no documents")

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> Record:
        tokens = np.frombuffer(self._source[index], dtype=np.int32)
        return Record(f"{self.directory}#{index}", self.kind.prepared(tokens))
