from fractions import Fraction

import pytest

from data.media import probe, write_video
from data.synth import pattern_frames
from data.windows import check_target_frames, frame_windows, longest_valid, resample


def spans(windows):
    """(start, length) per window, after checking each is consecutive."""
    for w in windows:
        assert w == list(range(w[0], w[0] + len(w)))
    return [(w[0], len(w)) for w in windows]


def test_longest_valid():
    assert [longest_valid(n) for n in (1, 2, 4, 5, 8, 9, 80, 81, 82)] == [1, 1, 1, 5, 5, 9, 77, 81, 81]


@pytest.mark.parametrize("bad", [[0], [4], [80], [1, 33, 50], []])
def test_target_frames_must_be_4k_plus_1(bad):
    with pytest.raises(ValueError, match="4k\\+1|empty"):
        check_target_frames(bad)


def test_bad_target_error_suggests_neighbours():
    with pytest.raises(ValueError, match="got 80: use 77 or 81"):
        frame_windows(100, [80], "head")


def test_head_every_fitting_target():
    assert spans(frame_windows(50, [45, 1, 25, 81], "head")) == [(0, 1), (0, 25), (0, 45)]


def test_chunk():
    assert spans(frame_windows(100, [25], "chunk")) == [(0, 25), (25, 25), (50, 25), (75, 25)]
    assert spans(frame_windows(60, [25, 33], "chunk")) == [(0, 25), (25, 25), (0, 33)]


def test_slide():
    assert spans(frame_windows(40, [17], "slide", stride=10)) == [(0, 17), (10, 17), (20, 17)]
    assert len(frame_windows(40, [17], "slide", stride=1)) == 24
    with pytest.raises(ValueError, match="stride"):
        frame_windows(40, [17], "slide")


def test_uniform():
    assert spans(frame_windows(100, [25], "uniform", count=3)) == [(0, 25), (38, 25), (75, 25)]
    assert spans(frame_windows(100, [25], "uniform", count=1)) == [(0, 25)]
    # Fewer distinct starts than asked: no duplicates.
    assert spans(frame_windows(27, [25], "uniform", count=5)) == [(0, 25), (1, 25), (2, 25)]
    with pytest.raises(ValueError, match="count"):
        frame_windows(100, [25], "uniform")


def test_full():
    assert spans(frame_windows(100, None, "full")) == [(0, 97)]
    assert spans(frame_windows(100, [17], "full", max_frames=50)) == [(0, 49)]
    assert spans(frame_windows(3, None, "full")) == [(0, 1)]


@pytest.mark.parametrize("mode", ["head", "chunk", "slide", "uniform", "full"])
@pytest.mark.parametrize(("num_frames", "expected"), [(1, 1), (5, 5), (20, 17), (32, 29)])
def test_short_clip_gives_one_window_in_every_mode(mode, num_frames, expected):
    windows = frame_windows(num_frames, [33, 49], mode, stride=4, count=3, max_frames=200)
    assert spans(windows) == [(0, expected)]


@pytest.mark.parametrize("mode", ["head", "chunk", "slide", "uniform"])
def test_a_clip_that_only_fits_stills_also_gives_its_longest_window(mode):
    """With target_frames = [1, 33, 49] a 20-frame clip keeps its motion: 1-frame windows plus (0, 17)."""
    windows = spans(frame_windows(20, [1, 33, 49], mode, stride=8, count=2))
    assert windows[-1] == (0, 17) and {f for _, f in windows} == {1, 17}
    assert {f for _, f in spans(frame_windows(4, [1, 33], mode, stride=8, count=1))} == {1}  # no motion to keep
    assert {f for _, f in spans(frame_windows(20, [1], mode, stride=8, count=1))} == {1}  # stills asked for


def test_unknown_mode_and_empty_clip():
    with pytest.raises(ValueError, match="mode must be one of"):
        frame_windows(10, [5], "random")
    with pytest.raises(ValueError, match="num_frames"):
        frame_windows(0, [5], "head")


def test_resample_constant_rate():
    t30 = [i / 30 for i in range(90)]  # 3 s at 30 fps
    assert resample(t30) == list(range(90))
    assert resample(t30, 30) == list(range(90))
    picks = resample(t30, 16)
    assert len(picks) == 48 and picks[:5] == [0, 2, 4, 6, 7]  # nearest to 0, 1.875, 3.75, 5.625, 7.5 (tie: earlier)
    assert resample([i / 8 for i in range(8)], 16) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7]  # repeats
    assert resample([i / 16 for i in range(33)], 8) == list(range(0, 33, 2))


def test_resample_offset_and_vfr():
    # Timestamps need not start at zero (MPEG-TS); across a long gap each grid time takes the nearer frame.
    assert resample([10.0, 10.1, 10.2, 10.9, 11.0], 10) == [0, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4]
    assert resample([5.0], 16) == [0]
    with pytest.raises(ValueError):
        resample([0, 1], 0)


# --- frame timing on real files: every container stores timestamps in its own time base --------------------

CONTAINERS = {"mp4": "libx264", "mkv": "libx264", "webm": "vp9", "avi": "mjpeg", "mov": "libx264"}
RATES = [Fraction(24000, 1001), Fraction(24), Fraction(25), Fraction(30000, 1001), Fraction(30), Fraction(60)]
TARGETS = ["source", 24, 16, 12]
CLIP_FRAMES = 30
# Variable frame rate: 30 fps with frames 5, 6 and 13 dropped (a phone under load). Every time on the
# 24/16/12 fps grids is >= 2 ms from the middle of two frames, so a container's ms rounding cannot tie it.
VFR_FRAMES = [Fraction(i, 30) for i in range(CLIP_FRAMES) if i not in (5, 6, 13)]


def nearest(times: list[Fraction], t: Fraction) -> set[int]:
    """Every frame index whose time is nearest to `t` (two on an exact tie)."""
    best = min(abs(x - t) for x in times)
    return {i for i, x in enumerate(times) if abs(x - t) == best}


def grid_length(times: list[Fraction], fps: Fraction) -> int:
    """Output frames on the fps grid that fall before the middle of the last frame's display time."""
    intervals = sorted(b - a for a, b in zip(times, times[1:]))
    end = times[-1] + intervals[len(intervals) // 2] / 2
    return int(end * fps) + 1


@pytest.fixture(
    scope="module", params=[(c, r) for c in CONTAINERS for r in RATES], ids=lambda p: f"{p[0]}-{float(p[1]):.3f}"
)
def cfr_clip(request, tmp_path_factory):
    container, rate = request.param
    path = tmp_path_factory.mktemp("timing") / f"clip.{container}"
    write_video(path, pattern_frames(CLIP_FRAMES, 32, 32), fps=rate, codec=CONTAINERS[container])
    return probe(path), rate


@pytest.mark.parametrize("target", TARGETS)
def test_resample_picks_the_nearest_frames_of_the_ideal_grid(cfr_clip, target):
    """Matroska/WebM round timestamps to whole ms (24 fps frames at 0, 42, 83 ms); the picks must not care."""
    info, rate = cfr_clip
    assert info.num_frames == CLIP_FRAMES
    fps = Fraction(float(rate) if target == "source" else target)
    picks = resample(info.timestamps, float(fps))
    if target == "source":
        assert picks == list(range(CLIP_FRAMES))
        assert resample(info.timestamps, round(float(rate), 2)) == picks  # 23.98 or 29.97 as a user writes it
        return
    ideal = [Fraction(i) / rate for i in range(CLIP_FRAMES)]
    assert len(picks) == grid_length(ideal, fps)
    assert all(p in nearest(ideal, k / fps) for k, p in enumerate(picks)), picks
    if fps <= rate:
        assert all(b > a for a, b in zip(picks, picks[1:])), picks


@pytest.mark.parametrize("container", ["mp4", "mkv", "webm", "mov"])  # AVI has no per-frame timestamps
def test_resample_variable_frame_rate_by_real_times(container, tmp_path):
    path = write_video(
        tmp_path / f"vfr.{container}",
        pattern_frames(len(VFR_FRAMES), 32, 32),
        codec=CONTAINERS[container],
        timestamps=[float(t) for t in VFR_FRAMES],
    )
    info = probe(path)
    assert info.num_frames == len(VFR_FRAMES)
    for target in (30, 24, 16, 12):
        fps = Fraction(target)
        picks = resample(info.timestamps, target)
        assert len(picks) == grid_length(VFR_FRAMES, fps)
        assert all(p in nearest(VFR_FRAMES, k / fps) for k, p in enumerate(picks)), (target, picks)
