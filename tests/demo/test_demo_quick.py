"""The short version of the README's main job (tools/demo.py --quick) runs end to end on the
real data and weights the set-up installs, and prints the GRPO-RM vs CE table."""
import re
import sys

from conftest import run_cmd


def test_quick_demo_prints_the_comparison_table(tmp_path) -> None:
    proc = run_cmd([sys.executable, 'tools/demo.py', '--quick', '--tasks', 'fashion_mnist',
                    '--data-dir', str(tmp_path / 'data'), '--work-dir', str(tmp_path / 'work')],
                   timeout=900)
    out = proc.stdout
    rows = re.findall(r'^\| ([^|]+?) \| (head top-1|kNN \(k=20\)|SR) \| ([\d.]+) \| ([\d.]+) \| '
                      r'([+-][\d.]+) \|$', out, flags=re.M)
    sets = {r[0] for r in rows}
    assert {'in-distribution', 'OOD average', 'fmnist-c/gaussian_noise'} <= sets, out[-3000:]
    for _set, _metric, grpo, ce, diff in rows:
        assert abs(float(grpo) - float(ce) - float(diff)) < 0.011
    # both heads learned something real: well above chance (10%) in distribution
    head = {r[0]: (float(r[2]), float(r[3])) for r in rows if r[1] == 'head top-1'}
    assert min(head['in-distribution']) > 40.0
    assert (tmp_path / 'work' / 'results.md').is_file()
    # the frozen-feature cache: the GRPO-RM run extracted and saved the training features, the
    # CE run (same frozen weights, same images) found them all in the file
    work = tmp_path / 'work' / 'fashion_mnist'
    assert 'entries saved' in (work / 'grpo_rm' / 'train.log').read_text()
    assert 'entries saved' not in (work / 'ce' / 'train.log').read_text()
    import torch
    cache = torch.load(tmp_path / 'data' / 'cache' / 'lite0_64px.pt', weights_only=True)
    assert len(cache['keys']) == 500 + 200 + 5 * 200  # each distinct image extracted once
