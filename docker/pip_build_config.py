"""Writes a pip configuration for `docker build` / `podman build` from the
host's own (every config file and PIP_* variable, as `pip config list` shows
them), with host paths moved to where the build mounts them:

  cert        -> /run/secrets/ca.crt               (--secret id=ca.crt)
  constraint  -> /run/secrets/pip-constraints.txt  (--secret id=pip-constraints.txt)
  find-links  -> /wheels for the first local folder (--build-context wheels=DIR)

Local file:// indexes (mirrors on the host's disk) are left out: the build
reaches the same packages through the remote index. Prints the build
options, one a line, for the caller to pass on.

    python docker/pip_build_config.py OUT_DIR
"""

from __future__ import annotations

import configparser
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

SECRET_DIR = "/run/secrets"
WHEELS_MOUNT = "/wheels"


def host_settings() -> dict[str, str]:
    """key -> value; later sources (user config, then PIP_* env) win."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], check=True, capture_output=True, text=True
    ).stdout
    order = {"global": 0, "install": 1, ":env:": 2}
    found: list[tuple[int, str, str]] = []
    for line in out.splitlines():
        name, _, raw = line.partition("=")
        section, _, key = name.rpartition(".")
        value = raw.strip().strip("'\"")
        found.append((order.get(section, 1), key, value))
    settings: dict[str, str] = {}
    for _, key, value in sorted(found, key=lambda item: item[0]):
        settings[key] = value
    return settings


def is_local(location: str) -> Path | None:
    parsed = urlparse(location)
    if parsed.scheme in ("", "file"):
        path = Path(parsed.path if parsed.scheme else location)
        return path
    return None


def main() -> int:
    out_dir = Path(sys.argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(out_dir, 0o700)
    settings = host_settings()
    options: list[str] = []
    notes: list[str] = []

    cert = settings.pop("cert", None)
    if cert and Path(cert).is_file():
        settings["cert"] = f"{SECRET_DIR}/ca.crt"
        options.append(f"--secret=id=ca.crt,src={cert}")

    constraint = settings.pop("constraint", None)
    if constraint:
        files = [Path(c) for c in constraint.split() if Path(c).is_file()]
        if files:
            merged = out_dir / "pip-constraints.txt"
            merged.write_text("".join(f.read_text() + "\n" for f in files))
            settings["constraint"] = f"{SECRET_DIR}/pip-constraints.txt"
            options.append(f"--secret=id=pip-constraints.txt,src={merged}")

    links = []
    wheels_dir = None
    for link in settings.pop("find-links", "").split():
        path = is_local(link)
        if path is None:
            links.append(link)
        elif path.is_dir() and wheels_dir is None:
            wheels_dir = path
            links.append(WHEELS_MOUNT)
            options.append(f"--build-context=wheels={path}")
        else:
            notes.append(f"find-links {link} left out (only one local folder is mounted)")
    if links:
        settings["find-links"] = " ".join(links)

    for key in ("index-url", "extra-index-url"):
        kept = []
        for url in settings.pop(key, "").split():
            if is_local(url) is not None:
                notes.append(f"{key} {url} left out (a mirror on the host's disk)")
            else:
                kept.append(url)
        if kept:
            settings[key] = " ".join(kept)

    parser = configparser.ConfigParser(interpolation=None)
    parser["global"] = settings
    conf = out_dir / "pip.conf"
    with conf.open("w") as handle:
        parser.write(handle)
    options.insert(0, f"--secret=id=pip.conf,src={conf}")
    for note in notes:
        print(f"pip_build_config: {note}", file=sys.stderr)
    print("\n".join(options))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
