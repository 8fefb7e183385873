package main

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"strconv"
	"strings"
)

// proxyV2Signature starts every PROXY protocol v2 header.
var proxyV2Signature = []byte("\r\n\r\n\x00\r\nQUIT\n")

// pp2TypeAuthority is PP2_TYPE_AUTHORITY (the SNI the proxy saw).
const pp2TypeAuthority = 0x02

// proxyHeader is the parsed PROXY protocol header, as reported in JSON.
type proxyHeader struct {
	Version   int        `json:"version"`
	Command   string     `json:"command"` // "PROXY" or "LOCAL"
	Family    string     `json:"family"`  // "TCP4", "TCP6", "UDP4", "UDP6", "UNIX", "UNSPEC", "UNKNOWN"
	Src       string     `json:"src,omitempty"`
	Dst       string     `json:"dst,omitempty"`
	Authority string     `json:"authority,omitempty"`
	TLVs      []proxyTLV `json:"tlvs,omitempty"`
}

// proxyTLV is one v2 TLV; the value is hex so binary custom TLVs survive JSON.
type proxyTLV struct {
	Type  int    `json:"type"`
	Value string `json:"value"`
}

// readProxyHeader consumes a v1 or v2 PROXY header from br and nothing more,
// so the TLS ClientHello stays in br for the handshake.
func readProxyHeader(br *bufio.Reader) (*proxyHeader, error) {
	start, err := br.Peek(5)
	if err != nil {
		return nil, fmt.Errorf("proxy: %w", err)
	}
	if string(start) == "PROXY" {
		return readProxyV1(br)
	}
	sig, err := br.Peek(len(proxyV2Signature))
	if err != nil || !bytes.Equal(sig, proxyV2Signature) {
		return nil, errors.New("proxy: no PROXY protocol header")
	}
	return readProxyV2(br)
}

func readProxyV1(br *bufio.Reader) (*proxyHeader, error) {
	// The spec caps a v1 line at 107 bytes including CRLF.
	var line []byte
	for len(line) < 107 {
		b, err := br.ReadByte()
		if err != nil {
			return nil, fmt.Errorf("proxy v1: %w", err)
		}
		line = append(line, b)
		if b == '\n' {
			break
		}
	}
	text, ok := strings.CutSuffix(string(line), "\r\n")
	if !ok {
		return nil, errors.New("proxy v1: line not terminated by CRLF within 107 bytes")
	}
	fields := strings.Split(text, " ")
	h := &proxyHeader{Version: 1, Command: "PROXY"}
	if len(fields) >= 2 && fields[1] == "UNKNOWN" {
		h.Family = "UNKNOWN"
		return h, nil
	}
	if len(fields) != 6 || (fields[1] != "TCP4" && fields[1] != "TCP6") {
		return nil, fmt.Errorf("proxy v1: malformed line %q", text)
	}
	h.Family = fields[1]
	src, err1 := v1AddrPort(fields[2], fields[4])
	dst, err2 := v1AddrPort(fields[3], fields[5])
	if err := errors.Join(err1, err2); err != nil {
		return nil, fmt.Errorf("proxy v1: %w", err)
	}
	h.Src, h.Dst = src.String(), dst.String()
	return h, nil
}

func v1AddrPort(addr, port string) (netip.AddrPort, error) {
	ip, err := netip.ParseAddr(addr)
	if err != nil {
		return netip.AddrPort{}, err
	}
	p, err := strconv.ParseUint(port, 10, 16)
	if err != nil {
		return netip.AddrPort{}, err
	}
	return netip.AddrPortFrom(ip, uint16(p)), nil
}

func readProxyV2(br *bufio.Reader) (*proxyHeader, error) {
	fixed := make([]byte, 16)
	if _, err := io.ReadFull(br, fixed); err != nil {
		return nil, fmt.Errorf("proxy v2: %w", err)
	}
	verCmd, fam := fixed[12], fixed[13]
	if verCmd>>4 != 2 {
		return nil, fmt.Errorf("proxy v2: bad version nibble 0x%02x", verCmd)
	}
	body := make([]byte, binary.BigEndian.Uint16(fixed[14:16]))
	if _, err := io.ReadFull(br, body); err != nil {
		return nil, fmt.Errorf("proxy v2: %w", err)
	}
	h := &proxyHeader{Version: 2}
	switch verCmd & 0x0f {
	case 0:
		h.Command = "LOCAL"
	case 1:
		h.Command = "PROXY"
	default:
		return nil, fmt.Errorf("proxy v2: bad command 0x%02x", verCmd)
	}
	transport := map[byte]string{1: "TCP", 2: "UDP"}[fam&0x0f]
	var addrLen int
	switch fam >> 4 {
	case 0:
		h.Family = "UNSPEC"
	case 1:
		h.Family, addrLen = transport+"4", 12
	case 2:
		h.Family, addrLen = transport+"6", 36
	case 3:
		h.Family, addrLen = "UNIX", 216
	default:
		return nil, fmt.Errorf("proxy v2: bad family 0x%02x", fam)
	}
	if len(body) < addrLen {
		return nil, errors.New("proxy v2: address block truncated")
	}
	if addrLen == 12 || addrLen == 36 {
		ipLen := (addrLen - 4) / 2
		src, _ := netip.AddrFromSlice(body[:ipLen])
		dst, _ := netip.AddrFromSlice(body[ipLen : 2*ipLen])
		ports := body[2*ipLen:]
		h.Src = netip.AddrPortFrom(src, binary.BigEndian.Uint16(ports[0:2])).String()
		h.Dst = netip.AddrPortFrom(dst, binary.BigEndian.Uint16(ports[2:4])).String()
	}
	r := &byteReader{b: body[addrLen:]}
	for len(r.b) > 0 {
		typ := r.u8()
		value := r.vec16()
		if r.err != nil {
			return nil, errors.New("proxy v2: TLV truncated")
		}
		if typ == pp2TypeAuthority {
			h.Authority = string(value)
		}
		h.TLVs = append(h.TLVs, proxyTLV{Type: typ, Value: hex.EncodeToString(value)})
	}
	return h, nil
}
