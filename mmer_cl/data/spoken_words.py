"""Spoken words synthesised offline with espeak-ng, as fixed-shape log-mel features, voices held out.

An utterance is one of `words` (default: the 20 core words of Google Speech Commands) said by one espeak-ng
voice variant (`m3`, `klatt2`, `Annie` ... 48 by default, 16 female) with an English accent (`en-us`,
`en-gb-scotland` ... 8), a speed (-s, words per minute) and a pitch (-p, 0-99) drawn at random; it is placed
at a random offset in a clip of `clip_samples` (22688 samples = 1.03 s at 22050 Hz) and mixed with coloured
Gaussian noise (power spectrum ~ f^-beta, beta ~ U[0, 2]: white to brown) at an SNR drawn from `snr_db`
(relative to the power of the trimmed speech).
Each (word, voice) pair gets `renditions` utterances: by default 20 x 48 x 4 = 3840.

Features: x = log(M^T |STFT(clip)|^2 + 1e-6), float32 [40, 64] (mel bands x frames): Hann window 512
(23 ms), hop 352 (16 ms), no centre padding, 40 HTK mel bands over 60-8000 Hz. With normalize=True (the
default) x is standardised by the scalar mean and std of the training split.

Splits are by voice variant: `seed` picks 1/6 of the variants for test and 1/6 for val, proportionally from
female and male voices; no variant occurs in two splits, so test speakers are never heard in training.
Default sizes: 32 / 8 / 8 voices -> 2560 / 640 / 640 utterances.

The features are generated once into cache_dir()/spoken_words/<hash of the settings>/ (features.safetensors
and manifest.json: settings, espeak-ng version, counts, time) and reused. The same settings give identical
features: every random draw comes from the settings' own seed and the utterance's index.
"""

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import time
import wave
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from mmer_cl.data.common import LabelledTensors, Splits, cache_dir, missing, publish_dir

# Bump when the generation or feature code changes what the same settings produce.
FORMAT_VERSION = 1
SAMPLE_RATE = 22050  # espeak-ng's output rate (MBROLA voices, not used here, run at 16 kHz)

WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go",
         "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
FEMALE_VOICES = ("Alicia", "Andrea", "Annie", "aunty", "belinda", "linda", "steph", "steph2", "steph3", "anika",
                 "f1", "f2", "f3", "f4", "f5", "grandma")
# klatt6 and caleb are left out: in espeak-ng 1.51 they sound exactly like klatt.
MALE_VOICES = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "klatt", "klatt2", "klatt3", "klatt4", "klatt5",
               "adam", "Alex", "Andy", "antonio", "benjamin", "david", "ed", "edward", "Gene", "iven", "john",
               "max", "Michael", "paul", "quincy", "rob", "robert", "norbert", "travis")
ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-gb-x-gbcwmd", "en-029",
           "en-us-nyc")


@dataclass(frozen=True)
class SpokenWordsSettings:
    """Everything that decides the generated features; its hash names the cache folder."""

    words: tuple[str, ...] = WORDS
    voices: tuple[str, ...] = FEMALE_VOICES + MALE_VOICES  # espeak-ng variant names (voices/!v/<name>)
    accents: tuple[str, ...] = ACCENTS
    speeds: tuple[int, ...] = (120, 145, 170, 195, 220)
    pitches: tuple[int, ...] = (25, 40, 55, 70, 85)
    renditions: int = 4  # utterances per (word, voice)
    snr_db: tuple[float, float] | None = (5.0, 20.0)  # background noise; None for clean speech
    seed: int = 0  # generation seed, independent of the split seed
    n_mels: int = 40
    frames: int = 64
    n_fft: int = 512
    hop_length: int = 352
    f_min: float = 60.0
    f_max: float = 8000.0

    @property
    def clip_samples(self) -> int:
        return self.n_fft + (self.frames - 1) * self.hop_length

    def key(self) -> str:
        text = json.dumps({"format": FORMAT_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def espeak_binary(espeak: str | None = None) -> str:
    """The espeak-ng executable: `espeak`, else $MMER_ESPEAK, else espeak-ng on PATH."""
    name = espeak or os.environ.get("MMER_ESPEAK") or "espeak-ng"
    path = shutil.which(name)
    if path is None:
        raise missing("espeak-ng", name, "espeak-ng",
                      "set MMER_ESPEAK (or espeak=) to the espeak-ng executable")
    return path


def _run(espeak: str, *args: str) -> bytes:
    done = subprocess.run([espeak, *args], capture_output=True)
    if done.returncode != 0 or not done.stdout:
        raise RuntimeError(f"{espeak} {' '.join(args)} failed ({done.returncode}): {done.stderr.decode()[-300:]}")
    return done.stdout


def espeak_version(espeak: str) -> str:
    text = _run(espeak, "--version").decode()
    found = re.search(r"text-to-speech:\s*(\S+)", text)
    return found.group(1) if found else text.strip()


def _check_voices(espeak: str, settings: SpokenWordsSettings) -> None:
    """Fail early, naming them, on variants or accents this espeak-ng does not have (it would silently fall
    back to a default voice)."""
    variants = set(re.findall(r"!v/(\S+)", _run(espeak, "--voices=variant").decode()))
    accents = {line.split()[1] for line in _run(espeak, "--voices=en").decode().splitlines()[1:] if line.split()}
    unknown = [v for v in settings.voices if v not in variants] + [a for a in settings.accents if a not in accents]
    if unknown:
        raise ValueError(f"espeak-ng has no voice variant or accent {unknown}; see espeak-ng --voices=variant "
                         "and espeak-ng --voices=en")


@lru_cache(maxsize=4)
def mel_filters(n_fft: int, n_mels: int, f_min: float, f_max: float) -> Tensor:
    """HTK mel filterbank [n_fft // 2 + 1, n_mels], triangles without area normalisation."""
    from transformers.audio_utils import mel_filter_bank

    bank = mel_filter_bank(n_fft // 2 + 1, n_mels, f_min, f_max, SAMPLE_RATE, norm=None, mel_scale="htk")
    return torch.from_numpy(bank).float()


def log_mel(clip: Tensor, settings: SpokenWordsSettings) -> Tensor:
    """[clip_samples] -> [n_mels, frames]: log(M^T |STFT|^2 + 1e-6), Hann window, no centre padding."""
    stft = torch.stft(clip, settings.n_fft, settings.hop_length, window=torch.hann_window(settings.n_fft),
                      center=False, return_complex=True)
    power = stft.abs().pow(2)  # [n_fft // 2 + 1, frames]
    return torch.log(mel_filters(settings.n_fft, settings.n_mels, settings.f_min, settings.f_max).T @ power + 1e-6)


def _plan(settings: SpokenWordsSettings) -> dict[str, np.ndarray]:
    """One row per utterance, in (word, voice, rendition) order: the indices and random draws it uses."""
    rng = np.random.default_rng(settings.seed)
    word, voice, _ = np.meshgrid(np.arange(len(settings.words)), np.arange(len(settings.voices)),
                                 np.arange(settings.renditions), indexing="ij")
    n = word.size
    return {"word": word.ravel(), "voice": voice.ravel(),
            "accent": rng.integers(len(settings.accents), size=n),
            "speed": rng.choice(np.array(settings.speeds), size=n),
            "pitch": rng.choice(np.array(settings.pitches), size=n),
            "snr_db": rng.uniform(*settings.snr_db, size=n) if settings.snr_db is not None else np.full(n, np.inf),
            "beta": rng.uniform(0.0, 2.0, size=n),
            "shift": rng.random(size=n)}


def _speak(espeak: str, text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    data = _run(espeak, "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text)
    with wave.open(io.BytesIO(data)) as wav:
        if wav.getframerate() != SAMPLE_RATE or wav.getsampwidth() != 2 or wav.getnchannels() != 1:
            raise ValueError(f"espeak-ng voice {voice} gave {wav.getframerate()} Hz, {wav.getsampwidth()}-byte, "
                             f"{wav.getnchannels()}-channel audio; expected 16-bit mono at {SAMPLE_RATE} Hz")
        samples = wav.readframes(wav.getnframes())  # the header's count is bogus on a pipe; reads to the end
    return np.frombuffer(samples, "<i2").astype(np.float32) / 32768.0


def _trim(wave_: np.ndarray) -> np.ndarray:
    """Cut leading and trailing silence: samples below 1% of the peak."""
    loud = np.nonzero(np.abs(wave_) > 0.01 * np.abs(wave_).max(initial=0.0))[0]
    return wave_[loud[0]:loud[-1] + 1] if len(loud) else wave_[:0]


def _noise(rng: np.random.Generator, n: int, beta: float) -> np.ndarray:
    """Unit-power Gaussian noise with power spectrum ~ f^-beta (0 white, 1 pink, 2 brown)."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n)
    freqs[0] = freqs[1]
    noise = np.fft.irfft(spectrum * freqs ** (-beta / 2), n=n)
    return noise / np.sqrt(np.mean(noise ** 2))


def _utterance(espeak: str, settings: SpokenWordsSettings, plan: dict, i: int) -> tuple[Tensor, bool]:
    """Features of utterance i and whether its speech was longer than the clip (then centre-cropped)."""
    voice = f"{settings.accents[plan['accent'][i]]}+{settings.voices[plan['voice'][i]]}"
    word, speed, pitch = settings.words[plan["word"][i]], int(plan["speed"][i]), int(plan["pitch"][i])
    speech = _trim(_speak(espeak, word, voice, speed, pitch))
    if len(speech) == 0:
        raise RuntimeError(f"espeak-ng gave silence for {word!r} with -v {voice} -s {speed} -p {pitch}")
    n = settings.clip_samples
    cropped = len(speech) > n
    if cropped:
        start = (len(speech) - n) // 2
        speech = speech[start:start + n]
    clip = np.zeros(n, np.float32)
    offset = int(plan["shift"][i] * (n - len(speech)))
    clip[offset:offset + len(speech)] = speech
    if np.isfinite(plan["snr_db"][i]):
        rng = np.random.default_rng([settings.seed, i])
        power = np.mean(speech.astype(np.float64) ** 2) / 10 ** (plan["snr_db"][i] / 10)
        clip += (np.sqrt(power) * _noise(rng, n, plan["beta"][i])).astype(np.float32)
    return log_mel(torch.from_numpy(clip), settings), cropped


def generate(settings: SpokenWordsSettings, folder: Path, espeak: str | None = None,
             workers: int | None = None) -> dict:
    """Synthesise every utterance (espeak-ng calls run `workers` at a time) and write features.safetensors
    and manifest.json into `folder`. Returns the manifest."""
    espeak, workers = espeak_binary(espeak), workers or os.cpu_count() or 1
    _check_voices(espeak, settings)
    plan = _plan(settings)
    n = len(plan["word"])
    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        results = list(tqdm(pool.map(lambda i: _utterance(espeak, settings, plan, i), range(n)), total=n,
                            desc="espeak-ng spoken words", unit="utt"))
    seconds = time.perf_counter() - start
    features = torch.stack([f for f, _ in results]).contiguous()
    tensors = {"features": features, **{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in plan.items()}}
    save_file(tensors, folder / "features.safetensors")
    manifest = {
        "settings": asdict(settings), "key": settings.key(), "format_version": FORMAT_VERSION,
        "espeak_ng": {"version": espeak_version(espeak), "path": espeak},
        "sample_rate": SAMPLE_RATE, "clip_samples": settings.clip_samples,
        "features": f"float32 [{settings.n_mels}, {settings.frames}] log(mel power + 1e-6)",
        "counts": {"utterances": n, "words": len(settings.words), "voices": len(settings.voices),
                   "per_word": n // len(settings.words), "cropped": int(sum(c for _, c in results))},
        "generation_seconds": round(seconds, 1), "workers": workers,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def generated(settings: SpokenWordsSettings, espeak: str | None = None, workers: int | None = None) -> Path:
    """The cache folder of these settings, generated first if it is not there yet."""
    folder = cache_dir() / "spoken_words" / settings.key()
    if not (folder / "manifest.json").is_file():
        publish_dir(lambda tmp: generate(settings, tmp, espeak, workers), folder)
    return folder


def split_voices(voices: tuple[str, ...], seed: int) -> dict[str, str]:
    """voice -> "train" / "val" / "test". Test and val get max(1, round(V / 6)) voices each. Voices are
    shuffled within gender and dealt in order of their rank / group size, so each split takes each gender
    in proportion."""
    if len(voices) < 3:
        raise ValueError(f"holding voices out needs at least 3 voice variants, got {list(voices)}")
    generator = torch.Generator().manual_seed(seed)
    female = [v for v in voices if v in FEMALE_VOICES]
    dealt = []
    for g, group in enumerate([female, [v for v in voices if v not in female]]):
        order = torch.randperm(len(group), generator=generator).tolist()
        dealt += [(rank / len(group), g, group[j]) for rank, j in enumerate(order)]
    held = max(1, round(len(voices) / 6))
    names = [voice for *_, voice in sorted(dealt)]
    return {voice: "test" if i < held else "val" if i < 2 * held else "train" for i, voice in enumerate(names)}


def load_spoken_words(seed: int = 0, settings: SpokenWordsSettings | None = None, normalize: bool = True,
                      espeak: str | None = None, workers: int | None = None) -> Splits:
    """Spoken-word splits held out by voice (see the module docstring). Generates the features on first use
    (about a minute for the default settings on 2 cores). Each example carries `.voice`, `.accent`, `.speed`,
    `.pitch` and `.snr_db`."""
    settings = settings or SpokenWordsSettings()
    folder = generated(settings, espeak, workers)
    tensors = load_file(folder / "features.safetensors")
    manifest = json.loads((folder / "manifest.json").read_text())
    split_of = split_voices(settings.voices, seed)
    voice = [settings.voices[v] for v in tensors["voice"].tolist()]
    accent = [settings.accents[a] for a in tensors["accent"].tolist()]
    features = tensors["features"]
    in_split = {name: torch.tensor([split_of[v] == name for v in voice]) for name in ("train", "val", "test")}
    info = {"manifest": str(folder / "manifest.json"), "espeak_ng": manifest["espeak_ng"]["version"],
            "voices": {name: sorted(v for v, s in split_of.items() if s == name) for name in in_split},
            "x": f"float32 [{settings.n_mels}, {settings.frames}] log-mel"}
    if normalize:
        train = features[in_split["train"]]
        mean, std = float(train.mean()), float(train.std())
        features = (features - mean) / std
        info["normalization"] = {"mean": mean, "std": std}

    def split(name: str) -> LabelledTensors:
        index = torch.nonzero(in_split[name]).flatten()
        return LabelledTensors(features[index], tensors["word"][index],
                               voice=[voice[i] for i in index.tolist()], accent=[accent[i] for i in index.tolist()],
                               speed=tensors["speed"][index], pitch=tensors["pitch"][index],
                               snr_db=tensors["snr_db"][index])

    return Splits(train=split("train"), val=split("val"), test=split("test"), classes=list(settings.words), info=info)
