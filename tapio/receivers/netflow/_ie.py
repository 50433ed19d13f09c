"""Information elements: the IANA IPFIX registry entries this receiver knows by number and name.

Invariants:
- Numbers and names are those of the IANA "IP Flow Information Export
  (IPFIX) Entities" registry. NetFlow v9 field types 1–127 are the same
  numbers with the same meaning (IPFIX took them over), so one table serves
  both protocols.
- An element's kind decides how a template field of that element is
  decoded: numbers of 1, 2, 4 or 8 bytes as integers in one struct code;
  addresses, MACs, strings and octet arrays as bytes; numbers of another
  length (reduced-size encoding, RFC 7011 §6.2) as bytes turned into an
  integer only where used. Elements not in the table decode as bytes.
"""

from __future__ import annotations

from typing import NamedTuple

# kinds of value
UNSIGNED = "unsigned"
SIGNED = "signed"
FLOAT = "float"
BOOLEAN = "boolean"
MAC = "mac"
IPV4 = "ipv4"
IPV6 = "ipv6"
STRING = "string"
OCTETS = "octets"
SECONDS = "seconds"  # dateTimeSeconds: unix seconds
MILLISECONDS = "milliseconds"  # dateTimeMilliseconds: unix milliseconds
MICROSECONDS = "microseconds"  # dateTimeMicroseconds: NTP timestamp (RFC 7011 §6.1.9)
NANOSECONDS = "nanoseconds"  # dateTimeNanoseconds: NTP timestamp

KINDS = (UNSIGNED, SIGNED, FLOAT, BOOLEAN, MAC, IPV4, IPV6, STRING, OCTETS, SECONDS, MILLISECONDS, MICROSECONDS, NANOSECONDS)
#: kinds whose value is a number on the wire
NUMERIC = frozenset({UNSIGNED, SIGNED, SECONDS, MILLISECONDS, BOOLEAN})

#: paddingOctets: skipped when decoding (RFC 7011 §3.3.1 allows it in templates)
PADDING = 210


class Element(NamedTuple):
    id: int
    name: str
    kind: str


_U, _S, _M, _4, _6, _T, _O = UNSIGNED, SIGNED, MAC, IPV4, IPV6, STRING, OCTETS

_TABLE: tuple[tuple[int, str, str], ...] = (
    (1, "octetDeltaCount", _U), (2, "packetDeltaCount", _U), (3, "deltaFlowCount", _U),
    (4, "protocolIdentifier", _U), (5, "ipClassOfService", _U), (6, "tcpControlBits", _U),
    (7, "sourceTransportPort", _U), (8, "sourceIPv4Address", _4), (9, "sourceIPv4PrefixLength", _U),
    (10, "ingressInterface", _U), (11, "destinationTransportPort", _U), (12, "destinationIPv4Address", _4),
    (13, "destinationIPv4PrefixLength", _U), (14, "egressInterface", _U), (15, "ipNextHopIPv4Address", _4),
    (16, "bgpSourceAsNumber", _U), (17, "bgpDestinationAsNumber", _U), (18, "bgpNextHopIPv4Address", _4),
    (19, "postMCastPacketDeltaCount", _U), (20, "postMCastOctetDeltaCount", _U), (21, "flowEndSysUpTime", _U),
    (22, "flowStartSysUpTime", _U), (23, "postOctetDeltaCount", _U), (24, "postPacketDeltaCount", _U),
    (25, "minimumIpTotalLength", _U), (26, "maximumIpTotalLength", _U), (27, "sourceIPv6Address", _6),
    (28, "destinationIPv6Address", _6), (29, "sourceIPv6PrefixLength", _U), (30, "destinationIPv6PrefixLength", _U),
    (31, "flowLabelIPv6", _U), (32, "icmpTypeCodeIPv4", _U), (33, "igmpType", _U), (34, "samplingInterval", _U),
    (35, "samplingAlgorithm", _U), (36, "flowActiveTimeout", _U), (37, "flowIdleTimeout", _U), (38, "engineType", _U),
    (39, "engineId", _U), (40, "exportedOctetTotalCount", _U), (41, "exportedMessageTotalCount", _U),
    (42, "exportedFlowRecordTotalCount", _U), (43, "ipv4RouterSc", _4), (44, "sourceIPv4Prefix", _4),
    (45, "destinationIPv4Prefix", _4), (46, "mplsTopLabelType", _U), (47, "mplsTopLabelIPv4Address", _4),
    (48, "samplerId", _U), (49, "samplerMode", _U), (50, "samplerRandomInterval", _U), (51, "classId", _U),
    (52, "minimumTTL", _U), (53, "maximumTTL", _U), (54, "fragmentIdentification", _U),
    (55, "postIpClassOfService", _U), (56, "sourceMacAddress", _M), (57, "postDestinationMacAddress", _M),
    (58, "vlanId", _U), (59, "postVlanId", _U), (60, "ipVersion", _U), (61, "flowDirection", _U),
    (62, "ipNextHopIPv6Address", _6), (63, "bgpNextHopIPv6Address", _6), (64, "ipv6ExtensionHeaders", _U),
    (70, "mplsTopLabelStackSection", _O), (71, "mplsLabelStackSection2", _O), (72, "mplsLabelStackSection3", _O),
    (73, "mplsLabelStackSection4", _O), (74, "mplsLabelStackSection5", _O), (75, "mplsLabelStackSection6", _O),
    (76, "mplsLabelStackSection7", _O), (77, "mplsLabelStackSection8", _O), (78, "mplsLabelStackSection9", _O),
    (79, "mplsLabelStackSection10", _O), (80, "destinationMacAddress", _M), (81, "postSourceMacAddress", _M),
    (82, "interfaceName", _T), (83, "interfaceDescription", _T), (84, "samplerName", _T),
    (85, "octetTotalCount", _U), (86, "packetTotalCount", _U), (87, "flagsAndSamplerId", _U),
    (88, "fragmentOffset", _U), (89, "forwardingStatus", _U), (90, "mplsVpnRouteDistinguisher", _O),
    (91, "mplsTopLabelPrefixLength", _U), (92, "srcTrafficIndex", _U), (93, "dstTrafficIndex", _U),
    (94, "applicationDescription", _T), (95, "applicationId", _O), (96, "applicationName", _T),
    (98, "postIpDiffServCodePoint", _U), (99, "multicastReplicationFactor", _U), (100, "className", _T),
    (101, "classificationEngineId", _U), (102, "layer2packetSectionOffset", _U), (103, "layer2packetSectionSize", _U),
    (104, "layer2packetSectionData", _O), (128, "bgpNextAdjacentAsNumber", _U), (129, "bgpPrevAdjacentAsNumber", _U),
    (130, "exporterIPv4Address", _4), (131, "exporterIPv6Address", _6), (132, "droppedOctetDeltaCount", _U),
    (133, "droppedPacketDeltaCount", _U), (134, "droppedOctetTotalCount", _U), (135, "droppedPacketTotalCount", _U),
    (136, "flowEndReason", _U), (137, "commonPropertiesId", _U), (138, "observationPointId", _U),
    (139, "icmpTypeCodeIPv6", _U), (140, "mplsTopLabelIPv6Address", _6), (141, "lineCardId", _U), (142, "portId", _U),
    (143, "meteringProcessId", _U), (144, "exportingProcessId", _U), (145, "templateId", _U),
    (146, "wlanChannelId", _U), (147, "wlanSSID", _T), (148, "flowId", _U), (149, "observationDomainId", _U),
    (150, "flowStartSeconds", SECONDS), (151, "flowEndSeconds", SECONDS), (152, "flowStartMilliseconds", MILLISECONDS),
    (153, "flowEndMilliseconds", MILLISECONDS), (154, "flowStartMicroseconds", MICROSECONDS),
    (155, "flowEndMicroseconds", MICROSECONDS), (156, "flowStartNanoseconds", NANOSECONDS),
    (157, "flowEndNanoseconds", NANOSECONDS), (158, "flowStartDeltaMicroseconds", _U),
    (159, "flowEndDeltaMicroseconds", _U), (160, "systemInitTimeMilliseconds", MILLISECONDS),
    (161, "flowDurationMilliseconds", _U), (162, "flowDurationMicroseconds", _U), (163, "observedFlowTotalCount", _U),
    (164, "ignoredPacketTotalCount", _U), (165, "ignoredOctetTotalCount", _U), (166, "notSentFlowTotalCount", _U),
    (167, "notSentPacketTotalCount", _U), (168, "notSentOctetTotalCount", _U), (176, "icmpTypeIPv4", _U),
    (177, "icmpCodeIPv4", _U), (178, "icmpTypeIPv6", _U), (179, "icmpCodeIPv6", _U), (180, "udpSourcePort", _U),
    (181, "udpDestinationPort", _U), (182, "tcpSourcePort", _U), (183, "tcpDestinationPort", _U),
    (184, "tcpSequenceNumber", _U), (185, "tcpAcknowledgementNumber", _U), (186, "tcpWindowSize", _U),
    (189, "ipHeaderLength", _U), (190, "totalLengthIPv4", _U), (192, "ipTTL", _U), (195, "ipDiffServCodePoint", _U),
    (196, "ipPrecedence", _U), (197, "fragmentFlags", _U), (205, "udpMessageLength", _U), (206, "isMulticast", _U),
    (210, "paddingOctets", _O), (224, "ipTotalLength", _U), (225, "postNATSourceIPv4Address", _4),
    (226, "postNATDestinationIPv4Address", _4), (227, "postNAPTSourceTransportPort", _U),
    (228, "postNAPTDestinationTransportPort", _U), (230, "natEvent", _U), (231, "initiatorOctets", _U),
    (232, "responderOctets", _U), (233, "firewallEvent", _U), (234, "ingressVRFID", _U), (235, "egressVRFID", _U),
    (239, "biflowDirection", _U), (243, "dot1qVlanId", _U), (244, "dot1qPriority", _U),
    (245, "dot1qCustomerVlanId", _U), (252, "ingressPhysicalInterface", _U), (253, "egressPhysicalInterface", _U),
    (254, "postDot1qVlanId", _U), (256, "ethernetType", _U), (281, "postNATSourceIPv6Address", _6),
    (282, "postNATDestinationIPv6Address", _6), (298, "initiatorPackets", _U), (299, "responderPackets", _U),
    (302, "selectorId", _U), (304, "selectorAlgorithm", _U), (305, "samplingPacketInterval", _U),
    (306, "samplingPacketSpace", _U), (307, "samplingTimeInterval", _U), (308, "samplingTimeSpace", _U),
    (309, "samplingSize", _U), (310, "samplingPopulation", _U), (311, "samplingProbability", FLOAT),
    (312, "dataLinkFrameSize", _U), (313, "ipHeaderPacketSection", _O), (315, "dataLinkFrameSection", _O),
    (322, "observationTimeSeconds", SECONDS), (323, "observationTimeMilliseconds", MILLISECONDS),
    (324, "observationTimeMicroseconds", MICROSECONDS), (325, "observationTimeNanoseconds", NANOSECONDS),
    (346, "privateEnterpriseNumber", _U), (351, "layer2SegmentId", _U), (352, "layer2OctetDeltaCount", _U),
    (353, "layer2OctetTotalCount", _U),
)

BY_ID: dict[int, Element] = {i: Element(i, n, k) for i, n, k in _TABLE}
BY_NAME: dict[str, Element] = {e.name: e for e in BY_ID.values()}


def kind_of(element_id: int, pen: int = 0) -> str:
    """The kind of an IANA element (enterprise and unknown elements are octets)."""
    if pen:
        return OCTETS
    found = BY_ID.get(element_id)
    return found.kind if found is not None else OCTETS


def parse_element(text: str) -> tuple[int, int]:
    """``(pen, id)`` from a mapping's element: an IANA name, a number, or ``pen:id`` for an enterprise element.

    Raises ValueError naming what is accepted.
    """
    text = text.strip()
    pen_text, sep, id_text = text.partition(":")
    if sep:
        if not (pen_text.isdigit() and id_text.isdigit()):
            raise ValueError(f"enterprise element {text!r}: write it as <enterprise number>:<element id>, e.g. 9:12232")
        pen, eid = int(pen_text), int(id_text)
        if not 0 < pen < 1 << 32 or not 0 < eid < 1 << 15:
            raise ValueError(f"enterprise element {text!r}: the enterprise number must be 1 to 4294967295 and the id 1 to 32767")
        return pen, eid
    if text.isdigit():
        eid = int(text)
        if not 0 < eid < 1 << 16:
            raise ValueError(f"element {text!r}: an element or NetFlow v9 field type is 1 to 65535")
        return 0, eid
    found = BY_NAME.get(text)
    if found is None:
        raise ValueError(f"element {text!r}: not an IANA element name this receiver knows; give its number instead (e.g. 34 for samplingInterval)")
    return 0, found.id
