"""pych.config.net: --net and --vsock."""

from __future__ import annotations

import pytest
from hypothesis import given

from pych.config import ConfigError, NetConfig, OptionError, VsockConfig

from .helpers import dump, vm
from .roundtrip import EXAMPLES, net_cli, nets


def test_net_defaults() -> None:
    assert dump(NetConfig.parse("tap=")) == {
        "pci_segment": 0,
        "num_queues": 2,
        "queue_size": 256,
        "vhost_user": False,
        "vhost_mode": "Client",
        "offload_tso": True,
        "offload_ufo": True,
        "offload_csum": True,
    }


def test_net_all_keys() -> None:
    net = NetConfig.parse(
        "tap=tap0,ip=192.168.1.1,mask=255.255.255.0,mac=12:34:56:78:9A:BC,"
        "host_mac=02:00:00:00:00:01,mtu=1500,num_queues=4,queue_size=512,fd=[3,4],"
        "vhost_mode=server,offload_tso=off,offload_ufo=off,offload_csum=off,id=net0,iommu=on"
    )
    assert net == NetConfig.model_validate(
        {
            "id": "net0",
            "iommu": True,
            "tap": "tap0",
            "ip": "192.168.1.1",
            "mask": "255.255.255.0",
            "mac": "12:34:56:78:9a:bc",
            "host_mac": "02:00:00:00:00:01",
            "mtu": 1500,
            "num_queues": 4,
            "queue_size": 512,
            "fds": [3, 4],
            "vhost_mode": "Server",
            "offload_tso": False,
            "offload_ufo": False,
            "offload_csum": False,
        }
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ip=300.1.1.1", "not an IPv4 or IPv6 address"),
        ("mac=12:34:56", "not a MAC address"),
        ("fd=[a]", r"invalid value '\[a\]' for 'fd'"),
        ("vhost_mode=both", "expected one of: client, server"),
    ],
)
def test_net_errors(text: str, message: str) -> None:
    with pytest.raises(OptionError, match=message):
        NetConfig.parse(text)


def test_net_ipv6_is_normalized() -> None:
    assert NetConfig.parse("ip=fd00:0::1,mask=ffff:ffff::").ip == "fd00::1"


@pytest.mark.parametrize(
    ("net", "message"),
    [
        ("num_queues=1", "should be higher than 2"),
        ("num_queues=4", r"Queue count \(4\) must not exceed boot vCPUs \(1\)"),
        ("fd=[3,4]", r"does not match the number of FDs \(4\)"),
        ("fd=[2]", r"Reserved fd number \(<= 2\): 2"),
        ("mtu=1000", "lower than 1280"),
        ("offload_csum=off", "depend on"),
        ("ip=10.0.0.1", "IP provided without a mask"),
        ("mask=255.0.0.0", "Mask provided without an IP"),
        ("queue_size=3", "power of 2"),
        ("vhost_user=on", "No socket provided when using vhost-user"),
        ("vhost_user=on,socket=/s,tap=t0", "A vhost-user net has no tap"),
        ("vhost_user=on,socket=/s,bw_size=1,bw_refill_time=1",
         "Rate limiting is not supported with vhost-user"),
    ],
)
def test_net_validation(net: str, message: str) -> None:
    config = vm(net=[NetConfig.parse(net).model_dump()])
    with pytest.raises(ConfigError, match=message):
        config.validate(check_support=False)  # the reference's rules, num_queues included


@EXAMPLES
@given(nets)
def test_net_cli_round_trip(net: NetConfig) -> None:
    assert NetConfig.parse(net_cli(net)) == net


def test_vsock() -> None:
    assert VsockConfig.parse("cid=3,socket=/v.sock") == VsockConfig(cid=3, socket="/v.sock")
    with pytest.raises(OptionError, match="cid missing"):
        VsockConfig.parse("socket=/v.sock")
    with pytest.raises(OptionError, match="cid: Input should be greater than or equal to 3"):
        VsockConfig.parse("cid=2,socket=/v")
    with pytest.raises(ConfigError, match="4294967295 is a special VSOCK CID"):
        vm(vsock={"cid": 2**32 - 1, "socket": "/v"}).validate()


def test_vhost_user_net_takes_queue_pairs() -> None:
    config = vm(net=[NetConfig.parse("vhost_user=on,socket=/s,num_queues=4").model_dump()])
    config.cpus.boot_vcpus = config.cpus.max_vcpus = 2
    config.validate(check_support=False)
    config = vm(net=[NetConfig.parse("vhost_user=on,socket=/s,num_queues=3").model_dump()])
    config.cpus.boot_vcpus = config.cpus.max_vcpus = 2
    with pytest.raises(ConfigError, match="num_queues=3 with vhost_user: a vhost-user net "
                                          "has 2 queues per queue pair"):
        config.validate(check_support=False)
