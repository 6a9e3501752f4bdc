"""Audio files for the HTTP routes: WAV, raw PCM, and the compressed formats libsndfile writes.

The engines produce float32 audio; the websocket sends it raw. Over HTTP the client may ask for a
file format instead. Each format can be written whole (exact headers, for a response with a
``Content-Length``) or streamed (bytes leave as the audio is generated, headers that cannot know
the length say "unknown", as every streamed file of these formats does).

FLAC, Ogg Opus and MP3 are encoded by libsndfile, which the ``soundfile`` wheel bundles with its
codecs (libFLAC, libopus, LAME): no system binary, no extra package. AAC has no encoder there and
is refused.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import numpy as np
import soundfile as sf

from chatterbox_sidecar.audio import encode_samples

# WAVE format tags of the protocol's encodings
_WAV_TAGS = {"pcm_s16le": (1, 16), "pcm_f32le": (3, 32), "pcm_mulaw": (7, 8)}
_UNKNOWN_SIZE = 0xFFFFFFFF  # a streamed WAV's RIFF and data sizes (what readers take as "to EOF")
MP3_RATES = frozenset({8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000})
OPUS_RATES = frozenset({8000, 12000, 16000, 24000, 48000})


@dataclass(frozen=True)
class AudioFormat:
    """A file format the HTTP routes can answer in.

    Parameters:
        name: The name clients use (``wav``, ``pcm``, ``flac``, ``mp3``, ``opus``).
        content_type: The response's ``Content-Type``.
        sf_format: libsndfile's major format, or None for the formats written here.
        sf_subtype: libsndfile's subtype.
        rates: Sample rates the codec takes, or None for any rate from 8 to 48 kHz.
        bitrate_mode: libsndfile's bitrate mode, where the codec has one.
        compression_level: libsndfile's compression level (0 best quality, 1 smallest).
    """

    name: str
    content_type: str
    sf_format: str | None = None
    sf_subtype: str | None = None
    rates: frozenset[int] | None = None
    bitrate_mode: str | None = None
    compression_level: float | None = None

    def rate_error(self, rate: int) -> str | None:
        """Returns: why this codec cannot take ``rate``, or None if it can."""
        if self.rates is None or rate in self.rates:
            return None
        return f"{self.name} takes sample rates {', '.join(str(r) for r in sorted(self.rates))}"

    def sf_options(self) -> dict:
        """Returns: the keyword arguments that open a libsndfile file of this format."""
        return {
            "format": self.sf_format,
            "subtype": self.sf_subtype,
            "bitrate_mode": self.bitrate_mode,
            "compression_level": self.compression_level,
        }

    @property
    def compressed(self) -> bool:
        """Returns: whether libsndfile encodes it (CPU work worth a worker thread)."""
        return self.sf_format is not None


FORMATS = {
    f.name: f
    for f in (
        AudioFormat("wav", "audio/wav"),
        AudioFormat("pcm", "application/octet-stream"),
        AudioFormat("flac", "audio/flac", "FLAC", "PCM_16"),
        # constant bitrate (about 80 kbit/s mono at 24 kHz): a reader can tell a streamed MP3's
        # length from its size, where the VBR info frame cannot be filled in
        AudioFormat("mp3", "audio/mpeg", "MP3", "MPEG_LAYER_III", MP3_RATES, "CONSTANT", 0.5),
        AudioFormat("opus", "audio/ogg", "OGG", "OPUS", OPUS_RATES),
    )
}
UNSUPPORTED_FORMATS = {"aac": "libsndfile, bundled by the soundfile wheel, has no AAC encoder"}


def wav_header(sample_rate: int, encoding: str, samples: int | None) -> bytes:
    """Build a mono WAV header.

    Args:
        sample_rate: Samples per second.
        encoding: ``pcm_s16le``, ``pcm_f32le`` (IEEE float) or ``pcm_mulaw`` (G.711).
        samples: The sample count, or None for a streamed file of unknown length.

    Returns:
        The header: RIFF, ``fmt``, for non-PCM encodings ``fact``, and the ``data`` chunk's
        header; the samples follow it.
    """
    tag, bits = _WAV_TAGS[encoding]
    block = bits // 8
    fmt = struct.pack("<HHIIHH", tag, 1, sample_rate, sample_rate * block, block, bits)
    chunks = b""
    if tag == 1:
        chunks += b"fmt " + struct.pack("<I", len(fmt)) + fmt
    else:  # non-PCM formats carry cbSize and a fact chunk with the sample count
        fmt += struct.pack("<H", 0)
        chunks += b"fmt " + struct.pack("<I", len(fmt)) + fmt
        count = _UNKNOWN_SIZE if samples is None else samples
        chunks += b"fact" + struct.pack("<II", 4, count)
    if samples is None:
        data_size = riff_size = _UNKNOWN_SIZE
    else:
        data_size = samples * block
        riff_size = 4 + len(chunks) + 8 + data_size + (data_size & 1)
    return (
        b"RIFF"
        + struct.pack("<I", riff_size)
        + b"WAVE"
        + chunks
        + b"data"
        + struct.pack("<I", data_size)
    )


def encode_file(audio: np.ndarray, sample_rate: int, fmt: AudioFormat, encoding: str) -> bytes:
    """Encode a whole utterance as one file with exact headers.

    Args:
        audio: Float32 mono samples at ``sample_rate``.
        sample_rate: Their rate.
        fmt: The file format.
        encoding: The sample encoding for ``wav`` and ``pcm`` (ignored by the others).

    Returns:
        The file's bytes.
    """
    if fmt.name == "pcm":
        return encode_samples(audio, encoding)
    if fmt.name == "wav":
        data = encode_samples(audio, encoding)
        pad = b"\0" if len(data) & 1 else b""
        return wav_header(sample_rate, encoding, len(audio)) + data + pad
    buf = io.BytesIO()
    with sf.SoundFile(buf, "w", samplerate=sample_rate, channels=1, **fmt.sf_options()) as f:
        f.write(audio)
    return buf.getvalue()


class StreamWriter:
    """Encodes one utterance chunk by chunk into a file that is sent as it grows.

    ``write`` and ``close`` return the bytes that are ready to send; concatenated, they make the
    file. Bytes once returned are never changed: where libsndfile seeks back on close to fill in
    a header (FLAC's total length and checksum), the streamed file keeps the "unknown" values it
    was first written with, which the formats allow. For MP3, the LAME info frame that libsndfile
    writes first as a zeroed placeholder (filled in on close) is left out: a stream of plain MP3
    frames (at a constant bitrate) decodes everywhere, a zeroed info frame misleads decoders.
    """

    def __init__(self, sample_rate: int, fmt: AudioFormat, encoding: str):
        """Initialize the writer.

        Args:
            sample_rate: Rate of the audio that will be written.
            fmt: The file format.
            encoding: The sample encoding for ``wav`` and ``pcm``.
        """
        self.fmt = fmt
        self.encoding = encoding
        self._header = wav_header(sample_rate, encoding, None) if fmt.name == "wav" else b""
        self._sink: _ForwardSink | None = None
        self._file: sf.SoundFile | None = None
        self._odd = False  # a WAV's data ends on an even byte
        if fmt.compressed:
            self._sink = _ForwardSink(skip_first_write=fmt.name == "mp3")
            self._file = sf.SoundFile(
                self._sink, "w", samplerate=sample_rate, channels=1, **fmt.sf_options()
            )

    def write(self, audio: np.ndarray) -> bytes:
        """Encode the next chunk.

        Args:
            audio: Float32 mono samples at the writer's rate.

        Returns:
            Bytes ready to send (possibly empty while an encoder fills a frame).
        """
        if self._file is not None:
            assert self._sink is not None
            if len(audio):
                self._file.write(audio)
            return self._sink.take()
        head, self._header = self._header, b""
        data = encode_samples(audio, self.encoding) if len(audio) else b""
        self._odd ^= bool(len(data) & 1)
        return head + data

    def close(self) -> bytes:
        """Finish the file.

        Returns:
            The last bytes to send.
        """
        if self._file is not None:
            assert self._sink is not None
            self._file.close()
            return self._sink.take()
        tail = self._header  # a file with no audio at all is its header alone
        self._header = b""
        return tail + (b"\0" if self._odd and self.fmt.name == "wav" else b"")


class _ForwardSink:
    """A file object for libsndfile whose bytes are taken away as soon as they are written.

    libsndfile needs ``seek``/``tell``/``read``/``write``; it may seek back and rewrite a header.
    Bytes before :meth:`take`'s mark are gone to the client: rewrites of them are dropped.
    """

    def __init__(self, skip_first_write: bool = False):
        self._buf = bytearray()  # bytes from offset ``_base`` on
        self._base = 0  # file offset of _buf[0]; everything before it has been taken
        self._pos = 0
        self._end = 0  # file length
        self._skip = skip_first_write
        self._skipped = 0  # leading bytes of the file that are never sent

    def write(self, data: bytes) -> int:
        data = bytes(data)
        start, end = self._pos, self._pos + len(data)
        self._pos = end
        if self._skip:  # the MP3 info frame placeholder: the file's first write
            self._skip = False
            self._skipped = end
        if end <= self._base:
            self._end = max(self._end, end)
            return len(data)  # a rewrite of bytes already sent
        if start < self._base:
            data, start = data[self._base - start :], self._base
        offset = start - self._base
        if offset > len(self._buf):
            self._buf.extend(b"\0" * (offset - len(self._buf)))
        self._buf[offset : offset + len(data)] = data
        self._end = max(self._end, end)
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR:
            offset += self._pos
        elif whence == io.SEEK_END:
            offset += self._end
        self._pos = offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def read(self, size: int = -1) -> bytes:
        start = max(self._pos - self._base, 0)
        stop = len(self._buf) if size < 0 else start + size
        data = bytes(self._buf[start:stop])
        self._pos += len(data)
        return data

    def take(self) -> bytes:
        """Returns: the bytes written since the last call, to send (never to be changed)."""
        data = bytes(self._buf)
        self._base += len(data)
        self._buf.clear()
        if self._skipped:
            cut = min(self._skipped, len(data))
            data, self._skipped = data[cut:], self._skipped - cut
        return data
