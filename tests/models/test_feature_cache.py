"""FeatureCache: served values are exactly the backbone's, computed once per distinct input."""
import torch

from grpo_rm_mm.models.feature_cache import FeatureCache, sample_key


class CountingNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.samples_seen = 0

    def forward(self, x):
        self.samples_seen += len(x)
        y = self.conv(x)
        return (y, y.mean((2, 3)))


def test_hits_return_exact_features_and_skip_the_backbone() -> None:
    torch.manual_seed(0)
    net, cache = CountingNet().eval(), FeatureCache()
    x = torch.randn(6, 3, 8, 8)
    with torch.no_grad():
        first = cache.features(x, net)
        assert net.samples_seen == 6
        # a batch mixing 3 seen samples (in another order) and 2 new ones
        new = torch.randn(2, 3, 8, 8)
        batch = torch.cat([x[[4, 0, 2]], new])
        second = cache.features(batch, net)
    assert net.samples_seen == 8  # only the 2 new samples were computed
    assert cache.hits == 3 and cache.misses == 8 and len(cache) == 8
    for a, b in zip(second, first):
        assert torch.equal(a[:3], b[[4, 0, 2]])  # bit-identical to what was computed
    with torch.no_grad():
        direct = net(new)
    assert torch.allclose(second[1][3:], direct[1], atol=1e-6)


def test_key_depends_on_content_dtype_and_shape() -> None:
    x = torch.zeros(2, 3)
    assert sample_key(x) == sample_key(x.clone())
    assert sample_key(x) != sample_key(x.double())
    assert sample_key(x) != sample_key(x.reshape(3, 2))
    y = x.clone()
    y[1, 2] = 1e-30
    assert sample_key(x) != sample_key(y)
    assert sample_key(torch.tensor(3)) != sample_key(torch.tensor(4))  # 0-dim (BN counters)


def test_max_items_bounds_memory_but_still_answers() -> None:
    net, cache = CountingNet().eval(), FeatureCache(max_items=2)
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        out = cache.features(x, net)
    assert len(cache) == 2 and out[0].shape[0] == 5


def test_save_load_roundtrip_only_for_the_same_weights(tmp_path) -> None:
    from grpo_rm_mm.models.feature_cache import fingerprint
    torch.manual_seed(0)
    net = CountingNet().eval()
    fp = fingerprint(net.state_dict().items())
    x = torch.randn(4, 3, 8, 8)
    cache = FeatureCache()
    with torch.no_grad():
        first = cache.features(x, net)
    assert cache.dirty
    cache.save(str(tmp_path / 'c.pt'), fp)
    assert not cache.dirty

    fresh, net2 = FeatureCache(), CountingNet().eval()
    net2.load_state_dict(net.state_dict())
    assert fresh.load(str(tmp_path / 'c.pt'), fingerprint(net2.state_dict().items()))
    with torch.no_grad():
        again = fresh.features(x, net2)
    assert net2.samples_seen == 0  # everything served from the file
    assert all(torch.equal(a, b) for a, b in zip(again, first))

    other = CountingNet().eval()  # different weights: the file must not be used
    assert not FeatureCache().load(str(tmp_path / 'c.pt'),
                                   fingerprint(other.state_dict().items()))
