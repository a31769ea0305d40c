"""Atomic files: written to a temporary name beside the target, then renamed, so that a crash or Ctrl-C never
leaves a half file that looks whole. Temporary names contain ".partial-" (remove_partials finds them) and keep
the extension (matplotlib and pyarrow pick the format from it)."""

import json
import os


def _file_mode() -> int:
    """What open() gives a new file under the current umask (some writers, safetensors', make 0600 files)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str, write, mode: int | None = None) -> None:
    """Call write(tmp_path), then rename over path (with `mode`, else the umask's permissions)."""
    folder, name = os.path.split(path)
    stem, ext = os.path.splitext(name)
    tmp = os.path.join(folder or ".", f".{stem}.partial-{os.getpid()}{ext}")
    try:
        write(tmp)
        os.chmod(tmp, _file_mode() if mode is None else mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text(path: str, text: str, mode: int | None = None) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)

    atomic_write(path, write, mode)


def write_json(path: str, obj) -> None:
    write_text(path, json.dumps(obj, indent=1))


def write_jsonl(path: str, rows: list) -> None:
    write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def remove_partials(folder: str) -> None:
    """Delete temporary files left by a killed run (never a finished file)."""
    for root, _, files in os.walk(folder):
        for name in files:
            if ".partial-" in name:
                os.remove(os.path.join(root, name))
