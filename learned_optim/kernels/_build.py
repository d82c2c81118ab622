"""Building the native kernels: the instruction-set targets, the CPU's flags, the compile into the cache folder
and the ``ctypes`` signatures of the library (see :mod:`learned_optim.kernels`)."""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .._files import write_atomically

logger = logging.getLogger("learned_optim.kernels")

SOURCE_DIR = Path(__file__).resolve().parent.parent / "csrc"


def read_sources(folder: Path) -> dict[str, bytes]:
    """The kernels' C++ sources and headers in ``folder``, by file name."""
    return {f.name: f.read_bytes() for f in sorted(folder.glob("*.[ch]*"))}


#: The sources as this process imported them: the library is built from these and keyed by them, so that a
#: process whose Python bindings (the functions' signatures below) were imported before an edit of ``csrc/``
#: never loads a library built from the edited files, whose signatures may differ.
SOURCES = read_sources(SOURCE_DIR)
FLAGS = ["-O3", "-ffp-contract=fast", "-fno-math-errno", "-fPIC", "-shared", "-std=gnu++17", "-pthread", "-Wno-psabi"]

#: The instruction-set targets, best first: compiler flags and the CPU flags (``/proc/cpuinfo``) they need.
ISAS: dict[str, tuple[list[str], frozenset[str]]] = {
    "avx512": (
        ["-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma", "-mf16c"],
        frozenset({"avx512f", "avx512dq", "avx512bw", "avx512vl", "avx2", "fma", "f16c"}),
    ),
    "avx2": (["-mavx2", "-mfma", "-mf16c"], frozenset({"avx2", "fma", "f16c"})),
    "portable": ([], frozenset()),
}


def openmp_flags(compiler_version: str) -> list[str]:
    """``["-fopenmp"]`` where the kernels can share torch's OpenMP threads, else ``[]``.

    That is where this process has GNU OpenMP (``libgomp``) loaded, as torch's Linux wheels do (they bundle it), and
    the compiler is GCC: the library then links ``libgomp.so.1``, which the dynamic linker resolves to the copy
    already loaded, so the kernels' parallel regions run on torch's own OpenMP threads (which, spinning after
    torch's last parallel op, take the work at once). Anywhere else (another OpenMP runtime, Clang's ``libomp``, no
    ``/proc``) and with ``$LEARNED_OPTIM_OPENMP=0`` the kernels start threads of their own: a second runtime's would
    compete with torch's for the cores."""
    switched_off = os.environ.get("LEARNED_OPTIM_OPENMP", "1").strip().lower() in ("0", "false", "no", "off")
    if switched_off or "clang" in compiler_version.lower():
        return []
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    # by the file name of its soname (other packages' bundled copies are renamed, libgomp-<hash>.so.*)
    loaded = any(line.rsplit("/", 1)[-1] == "libgomp.so.1" for line in maps)
    return ["-fopenmp"] if loaded else []


def cache_dir() -> Path:
    """Where the built libraries and their guard records live (``$LEARNED_OPTIM_CACHE/kernels``, else the XDG
    cache folder)."""
    root = os.environ.get("LEARNED_OPTIM_CACHE")
    if root:
        return Path(root) / "kernels"
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "learned_optim" / "kernels"


def _cpuinfo(prefixes: tuple[str, ...]) -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(prefixes):
                return line.split(":", 1)[-1].strip()
    except OSError:
        pass
    return ""


def cpu_flags() -> str:
    """The CPU's feature flags (``/proc/cpuinfo``), or what ``platform`` knows."""
    return _cpuinfo(("flags", "Features")) or platform.processor()


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what ``platform`` knows."""
    return _cpuinfo(("model name",)) or platform.processor() or platform.machine()


def _x86() -> bool:
    """Whether this machine is x86-64 (the architecture of every target of :data:`ISAS` but ``portable``)."""
    return platform.machine().lower() in ("x86_64", "amd64")


def supported_isas() -> list[str]:
    """The targets of :data:`ISAS` this CPU can execute, best first (``portable`` always)."""
    if not _x86():
        return ["portable"]
    flags = set(cpu_flags().split())
    return [name for name, (_, needs) in ISAS.items() if needs <= flags]


def requested_isa() -> str:
    """``$LEARNED_OPTIM_ISA`` if set (validated against the CPU), else the best supported target."""
    supported = supported_isas()
    wanted = os.environ.get("LEARNED_OPTIM_ISA", "").strip().lower()
    if not wanted:
        return supported[0]
    if wanted not in ISAS:
        raise ValueError(f"LEARNED_OPTIM_ISA={wanted!r} is not one of {sorted(ISAS)}")
    if wanted not in supported:
        raise ValueError(f"LEARNED_OPTIM_ISA={wanted!r}, but this CPU only runs {supported}")
    return wanted


def compile_library(compiler: list[str], flags: list[str], target: Path) -> None:
    """Compile every ``*.cpp`` of :data:`SOURCES` (``csrc/`` as imported) into the shared library ``target`` with
    ``compiler`` (a command: the compiler and its leading arguments, e.g. ``["ccache", "g++"]``), written
    atomically and recorded by its digest (:func:`intact`). Raises ``RuntimeError`` with the end of the compiler's
    output where the build fails."""

    def compile_into(path: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="learned_optim-csrc-") as folder:
            for name, text in SOURCES.items():
                (Path(folder) / name).write_bytes(text)
            sources = [str(Path(folder) / name) for name in SOURCES if name.endswith(".cpp")]
            subprocess.run(
                [*compiler, *flags, f"-I{folder}", "-o", str(path), *sources],
                check=True,
                capture_output=True,
                text=True,
                timeout=600,
            )
        write_atomically(_digest_path(target), _sha256(path).encode())  # before the library takes its name

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(target, compile_into)  # concurrent builders never load a half-written file
    except (OSError, subprocess.SubprocessError) as err:
        detail = getattr(err, "stderr", None) or err
        raise RuntimeError(
            f"building the native kernels failed: {' '.join(flags)}: {str(detail).strip()[-400:]}"
        ) from err


#: A temporary file in the cache older than this is a killed build's or write's, not one in progress.
STALE_TEMPORARY_SECONDS = 3600.0


def remove_stale_temporaries(folder: Path) -> None:
    """Remove what killed builds left in the cache folder: temporary files (``.*.tmp``, and the ``tmp*.so`` of
    earlier versions) older than :data:`STALE_TEMPORARY_SECONDS`."""
    now = time.time()
    for path in [*folder.glob(".*.tmp"), *folder.glob("tmp*.so")]:
        try:
            if now - path.stat().st_mtime > STALE_TEMPORARY_SECONDS:
                path.unlink()
        except OSError:  # gone already, or not ours to remove
            pass


def _digest_path(library: Path) -> Path:
    return library.with_name(library.name + ".sha256")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def intact(library: Path) -> bool:
    """Whether the cached ``library`` is the file its build wrote: its SHA-256 is the one recorded beside it. A
    damaged file (a copy cut short, a crash on a file system that had not written it) may map and then crash
    the process (SIGBUS) at its first call, which no exception can catch."""
    try:
        return _digest_path(library).read_text().strip() == _sha256(library)
    except OSError:
        return False


#: Flags a bundled library adds (:func:`prebuild`): on Linux the C++ runtime linked in and its symbols kept inside, so
#: that it needs nothing of the machine it runs on but the C library and no other library's C++ runtime (torch's)
#: takes its calls (elsewhere, macOS, the C++ runtime is the system's). It starts threads of its own (no OpenMP: the
#: runtime of the process that will load it is not known when it is built).
PREBUILT_FLAGS = (
    ["-static-libstdc++", "-static-libgcc", "-Wl,--exclude-libs,ALL"] if sys.platform.startswith("linux") else []
)


def prebuilt_dir() -> Path:
    """The folder of the libraries bundled with a wheel (:func:`prebuild`): ``$LEARNED_OPTIM_PREBUILT`` if set, else
    ``prebuilt/`` beside this module (empty in a source checkout)."""
    folder = os.environ.get("LEARNED_OPTIM_PREBUILT")
    return Path(folder).resolve() if folder else Path(__file__).resolve().parent / "prebuilt"


def architecture_isas() -> list[str]:
    """The targets of :data:`ISAS` a compiler for this machine's architecture can build, whatever this CPU runs."""
    return list(ISAS) if _x86() else ["portable"]


def _joined_sources() -> bytes:
    """:data:`SOURCES`, names and texts, as one byte string (what a library's name or cache key digests)."""
    return b"\0".join(name.encode() + text for name, text in SOURCES.items())


#: A digest of :data:`SOURCES`: a bundled library's name carries it (:func:`prebuilt_name`).
SOURCES_DIGEST = hashlib.sha256(_joined_sources()).hexdigest()[:16]


def prebuilt_name(isa: str) -> str:
    """The file name of the bundled library of ``isa``: this architecture's, built from :data:`SOURCES` (a digest of
    them, so that a library bundled with another version of the sources, whose signatures may differ, is never
    loaded)."""
    return f"learned_optim-{platform.machine().lower()}-{isa}-{SOURCES_DIGEST}.so"


def prebuild(folder: Path, isas: list[str] | None = None) -> list[Path]:
    """Compile the bundled libraries into ``folder``, one per target of ``isas`` (default: every target of this
    architecture, :func:`architecture_isas`), each with its digest beside it (:func:`intact`): what a wheel ships for
    machines without a C++ compiler (``python -m learned_optim.kernels prebuild``). Bundled libraries of other
    sources left in ``folder`` (which no process of this version would load, and a wheel would carry for nothing)
    are removed. Raises ``ValueError`` for a target of another architecture, ``RuntimeError`` when there is no
    compiler or the build fails."""
    targets = architecture_isas()
    wanted = isas or targets
    unknown = [isa for isa in wanted if isa not in targets]
    if unknown:
        raise ValueError(f"cannot build {unknown} for {platform.machine()}: its targets are {targets}")
    compiler, _ = _compiler()
    built = []
    for isa in wanted:
        target = folder / prebuilt_name(isa)
        logger.info("learned_optim: compiling the bundled native kernels (%s) into %s", isa, target)
        compile_library(compiler, FLAGS + ISAS[isa][0] + PREBUILT_FLAGS, target)
        built.append(target)
    for stale in folder.glob("learned_optim-*-*-*.so*"):  # bundled names only (not a cache's learned_optim-<key>.so)
        if SOURCES_DIGEST not in stale.name:
            logger.info("learned_optim: removing %s, bundled from other sources", stale)
            stale.unlink()
    return built


def is_prebuilt(library: Path) -> bool:
    """Whether ``library`` is a bundled one (:func:`prebuild`), not one compiled on this machine."""
    return library.parent == prebuilt_dir()


def guard_record_path(library: Path) -> Path:
    """Where the guard's measurements of ``library`` on this machine are kept: beside a library compiled here (its
    cache key covers the CPU), in the cache folder for a bundled one, by this CPU's model and flags (the package's
    folder may be read-only, and shared by machines)."""
    if not is_prebuilt(library):
        return library.with_suffix(".guard.json")
    machine = hashlib.sha256(f"{cpu_model()}\0{cpu_flags()}".encode()).hexdigest()[:16]
    return cache_dir() / f"{library.stem}-{machine}.guard.json"


def _compiler() -> tuple[list[str], str]:
    """The C++ compiler command (``$CXX``, which may hold a command with arguments, ``ccache g++``; else ``c++``) and
    its version text. Raises ``RuntimeError`` when there is none."""
    command = shlex.split(os.environ.get("CXX", "c++")) or ["c++"]
    found = shutil.which(command[0])
    if found is None:
        raise RuntimeError(f"no C++ compiler found (looked for {os.environ.get('CXX', 'c++')!r}; set $CXX)")
    compiler = [found, *command[1:]]
    try:
        version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise RuntimeError(f"the C++ compiler {' '.join(compiler)} does not run: {err}") from err
    return compiler, version


def _compiled(target_isa: str) -> Path:
    """The library of ``target_isa`` compiled on this machine: found in the cache, or built into it."""
    compiler, version = _compiler()
    flags = FLAGS + ISAS[target_isa][0] + openmp_flags(version)
    key = hashlib.sha256(
        b"\0".join(
            [
                _joined_sources(),
                version.encode(),
                " ".join(flags).encode(),
                platform.machine().encode(),
                cpu_model().encode(),
                cpu_flags().encode(),
            ]
        )
    ).hexdigest()[:16]
    target = cache_dir() / f"learned_optim-{key}.so"
    try:
        if target.exists() and not intact(target):
            logger.warning(
                "learned_optim: the cached native kernels %s are damaged or unrecorded; building again", target
            )
            target.unlink(missing_ok=True)
        missing = not target.exists()
        if missing:
            logger.info("learned_optim: compiling native kernels (%s) into %s", target_isa, target)
            remove_stale_temporaries(target.parent)
    except OSError as err:
        raise RuntimeError(f"the kernels' cache folder {target.parent} is not usable: {err}") from err
    if missing:
        compile_library(compiler, flags, target)
    return target


def _bundled(target_isa: str) -> tuple[Path, str]:
    """The best bundled library (:func:`prebuild`) this CPU runs, checked against its digest, and its ISA: of
    ``target_isa`` where ``$LEARNED_OPTIM_ISA`` asks for it, else of the first of :func:`supported_isas` bundled (a
    wheel may carry only some). Raises ``RuntimeError`` saying why there is none to load."""
    asked = bool(os.environ.get("LEARNED_OPTIM_ISA", "").strip())
    folder, reasons = prebuilt_dir(), []
    for isa in [target_isa] if asked else supported_isas():
        library = folder / prebuilt_name(isa)
        if not library.exists():
            reasons.append(f"no bundled kernels {library.name}")
        elif not intact(library):
            reasons.append(
                f"the bundled kernels {library.name} are damaged or unrecorded (their digest does not match)"
            )
        else:
            return library, isa
    raise RuntimeError(f"{'; '.join(reasons)} in {folder}")


def build() -> tuple[ctypes.CDLL, Path, str]:
    """Build (or find in the cache) the library for :func:`requested_isa` with this machine's C++ compiler, or where
    there is none or it fails, load the best one bundled with the package that the CPU runs (:func:`_bundled`,
    :func:`prebuild`); declare its functions' signatures. Returns the library, its file and its ISA (the bundled
    library's, which may be below :func:`requested_isa`). Raises ``RuntimeError`` when neither is to
    be had, saying why."""
    target_isa = requested_isa()
    try:
        target = _compiled(target_isa)
    except RuntimeError as compile_error:
        try:
            target, target_isa = _bundled(target_isa)
        except RuntimeError as bundle_error:
            raise RuntimeError(f"{compile_error}; {bundle_error}") from compile_error
        logger.info("learned_optim: %s; loading the bundled native kernels %s", compile_error, target)
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as err:
        raise RuntimeError(f"loading the native kernels {target} failed: {err}") from err
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn = lib.lo_lstm_cell_f32
    fn.argtypes = [i64, i64, i64, ptr, i64, ptr, i64, ptr, i64, ptr, ptr, ptr, i64, ptr, i64, ctypes.c_int]
    fn.restype = ctypes.c_int
    lib.lo_elu_f32.argtypes = [i64, ptr, ctypes.c_int]
    lib.lo_elu_f32.restype = None
    f32, f64, c_int = ctypes.c_float, ctypes.c_double, ctypes.c_int
    lib.lo_mlp_feature_sumsq_f32.argtypes = [i64, c_int, ptr, ptr, ptr, ptr, ptr, f32, ptr, c_int]
    lib.lo_mlp_feature_sumsq_f32.restype = c_int
    lib.lo_mlp_update_f32.argtypes = [
        i64,
        c_int,
        c_int,
        ptr,
        ptr,
        ptr,
        ptr,
        ptr,
        f32,
        ptr,
        ptr,
        ptr,
        ptr,
        f32,
        f32,
        ptr,
        ptr,
        ptr,
        c_int,
    ]
    lib.lo_mlp_update_f32.restype = c_int
    lib.lo_mlp_feature_sumsq_segments_f32.argtypes = [i64, ptr, *lib.lo_mlp_feature_sumsq_f32.argtypes[1:]]
    lib.lo_mlp_feature_sumsq_segments_f32.restype = c_int
    lib.lo_mlp_update_segments_f32.argtypes = [i64, ptr, *lib.lo_mlp_update_f32.argtypes[1:]]
    lib.lo_mlp_update_segments_f32.restype = c_int
    lib.lo_adafac_pack_step_f32.argtypes = [
        i64, ptr, c_int, *[ptr] * 11, f32, ptr, f32, ptr, f32, f32, ptr, c_int, f32,  # views, tensors, state, scalars
        c_int, c_int, *[ptr] * 5, f32, c_int, c_int, f32, f32, ptr, ptr,  # net, magnitude, clip, scales, out
        ptr, f64, f64, c_int,  # the decoupled update (param_out, lr, weight decay), threads
    ]  # fmt: skip
    lib.lo_adafac_pack_step_f32.restype = c_int
    lib.lo_vector_lanes.argtypes = []
    lib.lo_vector_lanes.restype = c_int
    lib.lo_uses_openmp.argtypes = []
    lib.lo_uses_openmp.restype = c_int
    return lib, target, target_isa
