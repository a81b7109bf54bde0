"""Install histosam's QuPath scripts, the service descriptor and a settings file in one folder.

Why a command rather than "copy the folder": QuPath runs a script without telling it where
the script file is, so each entry script carries the absolute folder of HistosamClient.groovy
in its ``HISTOSAM_SCRIPTS_DIR`` line, written here; and the descriptor set the client needs
(``segmentation.desc``, package data of ``histosam.v1``) must sit beside the scripts. The
folder is replaced in one ``os.replace`` (a QuPath session never sees half an install); a
user's ``histosam.properties`` and any other file of theirs in it are kept.

The grpc-java jars are not installed (no Maven access is assumed): ``QUPATH_JARS`` lists the
exact artifacts a user drops into QuPath's ``extensions`` folder, and ``check_jars`` says
which of them a QuPath user folder still lacks.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from histosam.backend.core.atomic import replace_dir
from histosam.backend.core.errors import BundleError, InvalidInputError

CLIENT_FILES = ("HistosamClient.groovy", "HistosamQuPath.groovy")
ENTRY_SCRIPTS = ("histosam_interactive.groovy", "histosam_refine.groovy", "histosam_batch_boxes.groovy")
DOC_FILES = ("README.md",)
DESCRIPTOR = "segmentation.desc"
SETTINGS_FILE = "histosam.properties"
PLACEHOLDER = "def histosamDir = null  // HISTOSAM_SCRIPTS_DIR"
MANAGED = (*CLIENT_FILES, *ENTRY_SCRIPTS, *DOC_FILES, DESCRIPTOR)


@dataclass(frozen=True)
class Jar:
    """One Maven artifact a QuPath user adds to the extensions folder."""

    group: str
    artifact: str
    version: str
    why: str

    @property
    def coordinates(self) -> str:
        return f"{self.group}:{self.artifact}:{self.version}"

    @property
    def file_name(self) -> str:
        return f"{self.artifact}-{self.version}.jar"


GRPC_JAVA = "1.70.0"
# The generic grpc-java runtime, no generated code: what HistosamClient.groovy imports, plus
# their runtime dependencies. grpc-java >= 1.58 keeps io.grpc.Context inside grpc-api.
QUPATH_JARS: tuple[Jar, ...] = (
    Jar("io.grpc", "grpc-api", GRPC_JAVA, "ManagedChannelBuilder, MethodDescriptor, Metadata, Status"),
    Jar("io.grpc", "grpc-stub", GRPC_JAVA, "ClientCalls.blockingUnaryCall, MetadataUtils"),
    Jar("io.grpc", "grpc-core", GRPC_JAVA, "the channel implementation"),
    Jar("io.grpc", "grpc-util", GRPC_JAVA, "load balancing used by grpc-core's default channel"),
    Jar("io.grpc", "grpc-netty-shaded", GRPC_JAVA, "the HTTP/2 transport, with its own relocated Netty"),
    Jar("com.google.protobuf", "protobuf-java", "3.25.5", "DynamicMessage, descriptor sets"),
    Jar("io.perfmark", "perfmark-api", "0.27.0", "tracing hooks grpc-core calls"),
)
# Runtime dependencies of those jars that QuPath 0.5 / 0.6 already ships: do not add a
# second copy (two Guavas on one class path fail in confusing ways).
ALREADY_IN_QUPATH = ("com.google.guava:guava", "com.google.guava:failureaccess", "com.google.code.gson:gson")


@dataclass
class InstallReport:
    dest: Path
    written: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    settings_written: bool = False
    replaced_existing: bool = False


def default_dest(qupath_dir: Path | None) -> Path:
    """``QUPATH_DIR/scripts/histosam`` for a QuPath user folder, else ``~/.histosam/qupath-scripts``."""
    if qupath_dir is not None:
        return Path(qupath_dir).expanduser() / "scripts" / "histosam"
    return Path.home() / ".histosam" / "qupath-scripts"


def check_qupath_dir(qupath_dir: Path) -> str | None:
    """Refuse a --qupath-dir that does not exist (a typo would otherwise become a new folder
    QuPath never reads); a note when it exists but holds nothing of QuPath's yet."""
    folder = Path(qupath_dir).expanduser()
    if not folder.exists():
        raise InvalidInputError(
            f"--qupath-dir {qupath_dir} does not exist: give QuPath's user folder (QuPath shows it under Edit > "
            "Preferences > 'QuPath user directory', e.g. ~/QuPath/v0.5), or install into any folder with --dest DIR"
        )
    if not folder.is_dir():
        raise InvalidInputError(f"--qupath-dir {qupath_dir} is not a folder")
    if not any((folder / sub).is_dir() for sub in ("extensions", "scripts")):
        return (f"note: {folder} has no extensions/ or scripts/ folder yet, so it may not be QuPath's user folder; "
                "the scripts go to its scripts/histosam")
    return None


def groovy_string(text: str) -> str:
    """A single-quoted Groovy string literal (Windows paths keep their backslashes)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def packaged_files() -> dict[str, bytes]:
    """The scripts, README and descriptor as installed with the package (or in the source tree)."""
    scripts = resources.files("histosam.qupath_scripts")
    out: dict[str, bytes] = {}
    for name in (*CLIENT_FILES, *ENTRY_SCRIPTS, *DOC_FILES):
        item = scripts / name
        if not item.is_file():
            raise BundleError(f"histosam.qupath_scripts lacks {name}: the installation is incomplete")
        out[name] = item.read_bytes()
    desc = resources.files("histosam.v1") / DESCRIPTOR
    if not desc.is_file():
        raise BundleError(f"histosam.v1 lacks {DESCRIPTOR}: regenerate it with python tools/protogen.py")
    out[DESCRIPTOR] = desc.read_bytes()
    return out


def with_scripts_dir(source: str, folder: Path) -> str:
    """An entry script whose ``HISTOSAM_SCRIPTS_DIR`` line names ``folder``."""
    if source.count(PLACEHOLDER) != 1:
        raise BundleError(f"an entry script lacks its '{PLACEHOLDER}' line")
    return source.replace(PLACEHOLDER, f"def histosamDir = {groovy_string(str(folder))}  // HISTOSAM_SCRIPTS_DIR")


def settings_text(server: str | None, token_file: Path | None) -> str:
    lines = [
        "# histosam QuPath scripts: where the server is and how to use it (java.util.Properties).",
        "# Every key can also be set as -Dhistosam.KEY=... (QuPath's Java options) or HISTOSAM_KEY.",
        f"server = {server or 'localhost:50051'}",
        f"token_file = {token_file}" if token_file else "# token_file = /path/to/token   (or: token = ...)",
        "# tls = false",
        "# timeout_seconds = 30",
        "# open_timeout_seconds = 300",
        "# max_message_mb = 64",
        "# model =                  (empty: the server's default)",
        "# class_name = Tumor       (class of the annotations the scripts create)",
        "# downsample = 0           (0: automatic, longest side <= max_side pixels)",
        "# max_side = 2048",
        "# margin = 0.25            (refine / boxes: context around the shape, x its size)",
        "# simplify = 0.5           (polygon simplification, image pixels; 0 keeps pixel outlines)",
        "# min_area = 16            (drop specks / fill holes below this many image pixels)",
        "# propagation = server     (on: clicks spread over their colour region, for soft tumour borders; off; auto)",
        "# slide_source = pixels    (path: the server reads the slide file itself; needs --slide-root)",
    ]
    return "\n".join(lines) + "\n"


def _update_settings(text: str, server: str | None, token_file: Path | None) -> str:
    """Set ``server`` / ``token_file`` in an existing properties text, keeping every other line."""
    updates = {k: v for k, v in (("server", server), ("token_file", str(token_file) if token_file else None)) if v}
    out, done = [], set()
    for line in text.splitlines():
        key = line.split("=", 1)[0].strip() if "=" in line and not line.lstrip().startswith("#") else None
        if key in updates:
            out.append(f"{key} = {updates[key]}")
            done.add(key)
        else:
            out.append(line)
    out += [f"{k} = {v}" for k, v in updates.items() if k not in done]
    return "\n".join(out) + "\n"


def install_scripts(
    dest: Path,
    *,
    server: str | None = None,
    token_file: Path | None = None,
    dry_run: bool = False,
) -> InstallReport:
    """Write the scripts, descriptor and settings into ``dest`` (replaced atomically)."""
    dest = Path(dest).expanduser().absolute()
    if dest.exists() and not dest.is_dir():
        raise InvalidInputError(f"{dest} exists and is not a folder")
    if token_file is not None and not Path(token_file).is_file():
        raise InvalidInputError(f"--token-file {token_file} does not exist")
    files = packaged_files()
    report = InstallReport(dest=dest, replaced_existing=dest.exists())
    for name, data in files.items():
        if name in ENTRY_SCRIPTS:
            files[name] = with_scripts_dir(data.decode("utf-8"), dest).encode("utf-8")
    old_settings = dest / SETTINGS_FILE
    if old_settings.is_file():
        settings = old_settings.read_text(encoding="utf-8")
        if server or token_file:
            settings = _update_settings(settings, server, token_file)
            report.settings_written = True
    else:
        settings = settings_text(server, token_file)
        report.settings_written = True
    files[SETTINGS_FILE] = settings.encode("utf-8")
    report.written = sorted(files)
    report.kept = sorted(p.name for p in dest.iterdir() if p.name not in files) if dest.is_dir() else []
    if dry_run:
        return report

    dest.parent.mkdir(parents=True, exist_ok=True)
    stage = dest.parent / f".{dest.name}.partial"
    old = dest.parent / f".{dest.name}.old"
    for leftover in (stage, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    stage.mkdir()
    for name, data in files.items():
        (stage / name).write_bytes(data)
        os.chmod(stage / name, 0o644)
    for name in report.kept:  # the user's own files in the folder stay
        src = dest / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, stage / name)
    replace_dir(stage, dest, backup=old)
    if old.exists():
        shutil.rmtree(old)
    return report


def check_jars(extensions_dir: Path) -> list[tuple[Jar, Path | None]]:
    """Each required jar and the file found for it (any version) under ``extensions_dir``."""
    found = [p for p in Path(extensions_dir).rglob("*.jar")] if Path(extensions_dir).is_dir() else []
    out = []
    for jar in QUPATH_JARS:
        match = next((p for p in sorted(found) if p.name.startswith(f"{jar.artifact}-")
                      and p.name[len(jar.artifact) + 1:len(jar.artifact) + 2].isdigit()), None)
        out.append((jar, match))
    return out
