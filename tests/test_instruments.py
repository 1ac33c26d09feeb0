"""The toy world's quality instrument (toy/instruments.py's KID-proxy) and the edit-preservation score:
reference computations and known answers on synthetic features and images."""
import numpy as np
import pytest

from toy import instruments


def reference_kid(a, b):
    """MMD^2_u with k(x, y) = (x.y / d + 1)^3, written out pair by pair."""
    k = lambda x, y: (x @ y / len(x) + 1) ** 3  # noqa: E731
    m, n = len(a), len(b)
    aa = sum(k(a[i], a[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    bb = sum(k(b[i], b[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    ab = sum(k(a[i], b[j]) for i in range(m) for j in range(n)) / (m * n)
    return aa + bb - 2 * ab


def test_kid_and_its_jackknife_equal_the_pair_by_pair_computation():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(12, 3)), rng.normal(0.5, 1.2, size=(9, 3))
    groups = np.repeat(np.arange(4), 3)  # 4 "strips" of 3 frames
    r = instruments.kid(a, b, groups)
    assert r["kid"] == pytest.approx(reference_kid(a, b), rel=1e-10)
    out_a = [reference_kid(a[groups != g], b) for g in range(4)]
    out_b = [reference_kid(a, np.delete(b, j, axis=0)) for j in range(len(b))]
    assert r["leave_out_a"] == pytest.approx(out_a, rel=1e-10) and r["leave_out_b"] == pytest.approx(out_b, rel=1e-10)
    var = 3 / 4 * np.sum((np.array(out_a) - np.mean(out_a)) ** 2) + \
        8 / 9 * np.sum((np.array(out_b) - np.mean(out_b)) ** 2)
    assert r["se"] == pytest.approx(np.sqrt(var), rel=1e-10)
    with pytest.raises(ValueError, match="same D"):
        instruments.kid(a, b[:, :2])


def test_kid_is_unbiased_in_n_where_the_frechet_estimate_is_not_and_its_se_is_the_spread():
    """Two samples of the same distribution: the mean KID over repetitions is 0 within its s.e. at n = 10
    and at n = 200, and the jackknife s.e. matches the spread over repetitions; the Frechet estimate is
    far above 0 at n = 10 and shrinks with n (its bias)."""
    rng = np.random.default_rng(1)
    d = 8
    for n, reps in ((10, 400), (200, 100)):
        kids, ses, fids = [], [], []
        for _ in range(reps):
            a, b = rng.normal(size=(n, d)), rng.normal(size=(n, d))
            r = instruments.kid(a, b)
            kids.append(r["kid"])
            ses.append(r["se"])
            fids.append(instruments.frechet_distance(a, b))
        spread = np.std(kids, ddof=1)
        assert abs(np.mean(kids)) < 3 * spread / np.sqrt(reps), (n, np.mean(kids), spread)
        assert 0.7 < np.mean(ses) / spread < 1.5, (n, np.mean(ses), spread)
        if n == 10:
            small_fid = np.mean(fids)
            assert small_fid > 20 * np.std(fids, ddof=1) / np.sqrt(reps)  # biased: far from 0
        else:
            assert np.mean(fids) < small_fid / 5  # and the bias shrinks with n


def test_kid_of_a_shifted_gaussian_has_the_closed_form():
    """N(0, I) against N(delta e_1, I): with k = 1 + 3s + 3s^2 + s^3 (s = x.y / d), MMD^2 sums the squared
    differences of the first three moment tensors: 3 |dm1|^2 / d + 3 |dM2|^2 / d^2 + |dT3|^2 / d^3, with
    |dm1|^2 = delta^2, |dM2|^2 = delta^4 and |dT3|^2 = delta^6 + 6 delta^4 + (3d + 6) delta^2."""
    rng = np.random.default_rng(2)
    d, delta, n = 4, 1.0, 3000
    exact = 3 * delta ** 2 / d + 3 * delta ** 4 / d ** 2 + (delta ** 6 + 6 * delta ** 4 + (3 * d + 6) * delta ** 2) / d ** 3
    a = rng.normal(size=(n, d))
    b = rng.normal(size=(n, d)) + delta * np.eye(d)[0]
    r = instruments.kid(a, b)
    assert abs(r["kid"] - exact) < 3 * r["se"] and r["se"] < 0.1 * exact, (r["kid"], r["se"], exact)


def test_kid_difference_of_paired_models_removes_what_they_share():
    """Two 'models' whose samples differ only slightly, scored on the same groups and real set: the
    paired s.e. of the difference is far below the two s.e.s combined, and the difference is exact."""
    rng = np.random.default_rng(3)
    real = rng.normal(size=(300, 4))
    base = rng.normal(0.3, 1, size=(120, 4))
    groups = np.repeat(np.arange(30), 4)
    a = instruments.kid(base, real, groups)
    b = instruments.kid(base + 0.05, real, groups)
    d = instruments.kid_difference(b, a)
    assert d["mean"] == pytest.approx(b["kid"] - a["kid"])
    assert d["se"] < 0.3 * np.hypot(a["se"], b["se"])
    with pytest.raises(ValueError, match="same groups"):
        instruments.kid_difference(instruments.kid(base[:60], real, groups[:60]), a)


def test_edit_scores_read_what_changed_and_what_stayed_on_drawn_edits():
    """Edits drawn by world.draw: a perfect recolouring changes only the shape's colour (target seen,
    everything kept, not one pixel outside the shape moved); no edit, a changed background and a changed
    shape each fail where they should."""
    from toy import report, world

    _, sources = world.make_images(6, seed=21, split="heldout")
    targets = [next(c for c in world.COLOURS if c not in (a["colour"], a["background"])) for a in sources]
    other_bg = [next(c for c in world.COLOURS if c not in (a["colour"], a["background"], t))
                for a, t in zip(sources, targets)]
    other_shape = [next(s for s in world.SHAPES if s != a["shape"]) for a in sources]
    recolour = lambda a, t, **kw: {**a, "colour": t, "colour_rgb": world.COLOURS[t], **kw}  # noqa: E731
    draw = lambda attrs: instruments.images01(np.stack([world.draw(a) for a in attrs]))  # noqa: E731
    source = draw(sources)
    perfect = report.edit_scores(draw([recolour(a, t) for a, t in zip(sources, targets)]), source, sources, targets)
    assert perfect["target_seen"] == perfect["kept_all"] == perfect["success"] == 1.0
    assert perfect["outside_mse"] == 0.0
    unchanged = report.edit_scores(source, source, sources, targets)
    assert unchanged["target_seen"] == 0.0 and unchanged["kept_all"] == 1.0 and unchanged["success"] == 0.0
    background = draw([recolour(a, t, background=b, background_rgb=world.COLOURS[b])
                       for a, t, b in zip(sources, targets, other_bg)])
    moved = report.edit_scores(background, source, sources, targets)
    assert moved["kept_background"] == 0.0 and moved["success"] == 0.0
    expected = [np.mean((np.array(world.COLOURS[b]) / 255 - np.array(a["background_rgb"]) / 255) ** 2)
                for a, b in zip(sources, other_bg)]
    assert moved["per_image"]["outside_mse"] == pytest.approx(expected, rel=1e-5)
    reshaped = report.edit_scores(draw([recolour(a, t, shape=s) for a, t, s in zip(sources, targets, other_shape)]),
                                  source, sources, targets)
    assert reshaped["kept_shape"] == 0.0 and reshaped["target_seen"] == 1.0 and reshaped["success"] == 0.0
    mask = report.outside_shape(sources[0])
    a = sources[0]
    assert not mask[int(a["cy"]), int(a["cx"])] and mask.sum() < 32 * 32 - np.pi * a["r"] ** 2 * 0.5


def test_a_ddim_inversion_steps_round_trip_error_is_c_t_times_the_change_of_eps_along_the_trajectory():
    """toy/diagnose.py's decomposition: sampling back one inverted step errs by exactly
    |sqrt(1 - abar_s) - sqrt(abar_s (1 - abar_t) / abar_t)| ||eps(x_t, t) - eps(x_s, t)|| (s = t - stride)."""
    import sampler
    from toy import diagnose, tables, world

    models = tables.load(world.MODEL_DIR)
    images, attributes = world.make_images(2, seed=3)
    r = diagnose.inversion_steps(models, instruments.images01(np.array(images)), [world.caption(a) for a in attributes],
                                 steps=4)
    schedule = sampler.make_schedule(models.scheduler_config)
    assert r["t"] == sorted(r["t"]) and len(r["t"]) == 4
    for k, t in enumerate(r["t"]):
        at, ap = (float(sampler._abar(schedule, x)) for x in (t, t - 250))
        c = abs((1 - ap) ** 0.5 - (ap * (1 - at) / at) ** 0.5)
        expected = c * np.array(r["gain_trajectory"][k]) * np.array(r["step"][k])
        assert np.allclose(r["round_trip"][k], expected, rtol=1e-3), (t, r["round_trip"][k], expected)
    assert np.all(np.array(r["gain_random"]) > 0)
