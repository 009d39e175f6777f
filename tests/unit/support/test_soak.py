"""The soak's pass criterion (tests/support/soak.py) on made-up samples: no guest needed."""

from tests.support.soak import Sample, SoakResult, proc_metrics, save_plot


def sample(cycle, *, fds=26, threads=8, memslots=2, anon_mib=60.0, shape="VirtioMem:p/e",
           operation="cpu"):
    return Sample(cycle, operation, 10.0, 100 * 1024, int(anon_mib * 1024), 30 * 1024, fds,
                  threads, memslots, shape)


def test_warm_up_is_not_judged_and_each_shape_has_its_own_baseline():
    r = SoakResult(rss_bound_mib=16, warmup=2)
    r.add(sample(1, fds=30))                          # warm-up: anything goes
    r.add(sample(2, fds=20, anon_mib=10))
    r.add(sample(3))                                  # baseline of VirtioMem:p/e
    r.add(sample(4, fds=24, shape="VirtioMem:p/a"))   # after a reboot: another shape
    r.add(sample(5, anon_mib=70))
    r.add(sample(6, fds=24, shape="VirtioMem:p/a"))
    assert [s.verdict for s in r.samples] == ["", "", "ok (baseline)", "ok (baseline)", "ok", "ok"]
    assert r.passed and r.failures == []
    assert r.anon_growth_kib() == 10 * 1024
    assert "soak PASS: 6 cycles, warm-up 2, 4 checkpoints" in r.summary()


def test_any_fd_thread_or_memslot_more_and_heap_beyond_the_bound_fail():
    r = SoakResult(rss_bound_mib=16, warmup=0)
    r.add(sample(1))
    r.add(sample(2, fds=27))
    r.add(sample(3, threads=9, memslots=3))
    r.add(sample(4, anon_mib=60 + 16.5))
    assert [s.verdict for s in r.samples] == [
        "ok (baseline)", "GREW: fds 26->27", "GREW: threads 8->9, memslots 2->3",
        "GREW: RssAnon +16.5 MiB"]
    assert not r.passed and len(r.failures) == 3
    assert "cycle 2 (cpu, VirtioMem:p/e): fds 26->27" in r.summary()
    table = r.table().splitlines()
    assert table[0].split()[:3] == ["cycle", "operation", "s"] and len(table) == 2 + 4 + 1


def test_no_checkpoint_after_the_warm_up_is_no_pass():
    r = SoakResult(rss_bound_mib=16, warmup=5)
    r.add(sample(1))
    assert not r.passed


def test_metrics_of_this_process():
    import os
    m = proc_metrics(os.getpid())
    assert m["fds"] > 2 and m["threads"] >= 1 and m["rss_kib"] >= m["anon_kib"] > 0


def test_plot_or_a_clear_false(tmp_path):
    r = SoakResult(rss_bound_mib=16, warmup=0)
    for cycle in range(1, 4):
        r.add(sample(cycle))
    path = tmp_path / "soak.png"
    made = save_plot(r, path)
    assert made == path.exists()
