"""The narrowest CIDRs that cover the addresses seen, never wider than a bound.

Addresses are grouped by the block of the bound (a /24 for IPv4, a /48 for IPv6; with
``widen``, a /16 and a /32), and each group becomes the one smallest prefix that holds all of
its addresses: one address is a /32 (/128), 192.0.2.10 and 192.0.2.20 are 192.0.2.0/27.  A rule
learned from what was seen never allows a block wider than the bound: addresses in two blocks are
two networks.  An IPv4-mapped or NAT64 address stands for the IPv4 host it reaches, as the allow
rules read it (:func:`agent.allow.remote_addresses`).
"""

from __future__ import annotations

import ipaddress
from typing import Dict, Iterable, List, Optional, Tuple

from agent.allow import remote_addresses
from agent.config import Network

BOUNDS = {4: 24, 6: 48}
WIDE_BOUNDS = {4: 16, 6: 32}


def rule_address(text: str) -> Optional[Tuple[int, int]]:
    """(IP version, address as an integer) a rule names for a remote address; None when the
    text is no address."""
    found = remote_addresses(text)
    if not found:
        return None
    address = found[-1]
    return address.version, int(address)


def covering_networks(addresses: Iterable[str], widen: bool = False) -> List[Network]:
    """The networks covering ``addresses`` (text, as the history holds them), in address order;
    text that is no address is left out."""
    bounds = WIDE_BOUNDS if widen else BOUNDS
    groups: Dict[Tuple[int, int], List[int]] = {}
    for text in addresses:
        found = rule_address(text)
        if found is None:
            continue
        version, value = found
        bits = 32 if version == 4 else 128
        block = value >> (bits - bounds[version])
        groups.setdefault((version, block), []).append(value)
    networks: List[Network] = []
    for (version, _), values in sorted(groups.items()):
        bits = 32 if version == 4 else 128
        low, high = min(values), max(values)
        prefix = bits - (low ^ high).bit_length()
        base = low >> (bits - prefix) << (bits - prefix) if prefix < bits else low
        network_class = ipaddress.IPv4Network if version == 4 else ipaddress.IPv6Network
        networks.append(network_class((base, prefix)))
    return networks
