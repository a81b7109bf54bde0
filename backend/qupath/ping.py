"""`histosam qupath ping`: the QuPath scripts' own client (HistosamClient.groovy on grpc-java)
asks a server for its info, headless, so the jars, the scripts and their settings can be
checked before QuPath is opened.

It runs ``histosam_ping.groovy`` (shipped with the scripts) under Groovy, on the grpc-java
jars of a folder (QuPath's extensions folder plus what QuPath itself ships, or any folder) or
Debian's packaged grpc-java; the tests run the client the same way.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from histosam.backend.core.errors import HistosamError, NotFoundError

JAVA_SHARE = Path("/usr/share/java")
# What the client needs from Debian's grpc-java 1.41 (grpc-context is inside grpc-api from
# 1.58 on; netty-codec-http is needed by the HTTP/2 codec).
DEBIAN_JARS = (
    "grpc-api", "grpc-context", "grpc-core", "grpc-netty", "grpc-stub", "protobuf", "guava", "perfmark-api",
    "netty-buffer", "netty-codec", "netty-codec-http", "netty-codec-http2", "netty-common", "netty-handler",
    "netty-resolver", "netty-transport",
)
DEBIAN_PACKAGES = "default-jdk-headless groovy libgrpc-java libprotobuf-java libnetty-java libguava-java libperfmark-java"
# In a --jars folder: artifacts without which no channel can be made (any version).
REQUIRED_IN_FOLDER = ("grpc-api", "grpc-core", "grpc-stub", "protobuf-java", "guava")
PING_SCRIPT = "histosam_ping.groovy"
JVM_START_SECONDS = 120.0  # JVM start-up and compiling the client, on top of the call's own timeout


@dataclass(frozen=True)
class PingResult:
    ok: bool
    line: str  # the server's info on success, the client's message otherwise


def java_home() -> str | None:
    """A JDK for Debian's Groovy 2.4: 17 first (what it is tested with), then JAVA_HOME, then any."""
    jvm = Path("/usr/lib/jvm")
    found = sorted(str(p) for p in jvm.glob("*")) if jvm.is_dir() else []
    candidates = [c for c in found if "-17-" in c] + [os.environ.get("JAVA_HOME"), str(jvm / "default-java"), *found]
    return next((c for c in candidates if c and (Path(c) / "bin" / "java").is_file()), None)


def classpath(jars_dir: Path | None) -> str:
    """The grpc-java class path: every jar under ``jars_dir``, else Debian's packaged jars."""
    if jars_dir is not None:
        if not Path(jars_dir).is_dir():
            raise NotFoundError(f"--jars {jars_dir} is not a folder")
        jars = sorted(Path(jars_dir).rglob("*.jar"))
        names = [j.name for j in jars]
        missing = [a for a in REQUIRED_IN_FOLDER
                   if not any(n.startswith(f"{a}-") and n[len(a) + 1:len(a) + 2].isdigit() for n in names)]
        if missing:
            raise NotFoundError(f"--jars {jars_dir} lacks {', '.join(missing)} (*.jar): see `histosam qupath "
                                "install-scripts` for the list (QuPath itself ships guava)")
        return os.pathsep.join(str(j) for j in jars)
    missing = [j for j in DEBIAN_JARS if not (JAVA_SHARE / f"{j}.jar").is_file()]
    if missing:
        raise NotFoundError(f"grpc-java jars missing from {JAVA_SHARE} ({', '.join(missing[:4])}"
                            f"{', ...' if len(missing) > 4 else ''}): apt-get install {DEBIAN_PACKAGES}, or give "
                            "--jars DIR")
    return os.pathsep.join(str(JAVA_SHARE / f"{j}.jar") for j in DEBIAN_JARS)


def packaged_scripts() -> Path:
    return Path(str(resources.files("histosam.qupath_scripts")))


def ping(
    *,
    server: str | None = None,
    token_file: Path | None = None,
    tls: bool = False,
    scripts: Path | None = None,
    jars: Path | None = None,
    timeout: float = 10.0,
) -> PingResult:
    """Run the Groovy client's ping; raises HistosamError (one line) when it cannot run at all."""
    groovy = shutil.which("groovy")
    if groovy is None:
        raise NotFoundError(f"groovy is not installed (apt-get install {DEBIAN_PACKAGES}); without it, check the "
                            "scripts from QuPath's script editor instead")
    cp = classpath(jars)
    home = java_home()
    if home is None:
        raise NotFoundError("no JDK found for groovy (apt-get install default-jdk-headless, or set JAVA_HOME)")
    folder = Path(scripts) if scripts is not None else packaged_scripts()
    if not (folder / "HistosamClient.groovy").is_file():
        raise NotFoundError(f"{folder} holds no HistosamClient.groovy (install it with `histosam qupath "
                            "install-scripts`, or leave out --scripts)")
    settings = {"histosam.timeout_seconds": f"{timeout:g}"}
    if server:
        settings["histosam.server"] = server
    if token_file is not None:
        settings["histosam.token_file"] = str(Path(token_file).absolute())
    if tls:
        settings["histosam.tls"] = "true"
    if not (folder / "segmentation.desc").is_file():  # the package's scripts: the descriptor is elsewhere
        settings["histosam.descriptor"] = str(resources.files("histosam.v1") / "segmentation.desc")
    command = [groovy, "-cp", cp, str(packaged_scripts() / PING_SCRIPT), str(folder),
               *(f"{k}={v}" for k, v in settings.items())]
    env = {**os.environ, "JAVA_HOME": home}
    try:
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout + JVM_START_SECONDS)
    except subprocess.TimeoutExpired:
        raise HistosamError(f"the Groovy client did not finish within {timeout + JVM_START_SECONDS:g} s") from None
    out = [line for line in proc.stdout.splitlines() if line.strip()]
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    if proc.returncode == 0 and out:
        return PingResult(True, out[-1])
    if proc.returncode == 1 and err:
        return PingResult(False, err[-1])
    last = next((line for line in reversed(err) if "Exception" in line or "Error" in line), err[-1] if err else "")
    raise HistosamError(f"the Groovy client failed to run (exit {proc.returncode}): {last.strip()[:300]}")
