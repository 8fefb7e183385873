package main

import (
	"bytes"
	"encoding/binary"
	"io"
	"net"
	"time"
)

// TLS record layer constants (RFC 8446 section 5).
const (
	recordHeaderLen        = 5
	recordChangeCipherSpec = 20
	recordHandshake        = 22
)

// extensionECH is the encrypted_client_hello extension type (RFC 9849).
const extensionECH = 0xfe0d

// maxSniffedHello bounds the bytes helloSniffer buffers looking for a ClientHello.
const maxSniffedHello = 1 << 17

// helloRetryRequestRandom is the ServerHello.random that marks a HelloRetryRequest.
var helloRetryRequestRandom = []byte{
	0xcf, 0x21, 0xad, 0x74, 0xe5, 0x9a, 0x61, 0x11, 0xbe, 0x1d, 0x8c, 0x02, 0x1e, 0x65, 0xb8, 0x91,
	0xc2, 0xa2, 0x11, 0x16, 0x7a, 0xbb, 0x8c, 0x5e, 0x07, 0x9e, 0x09, 0xe2, 0xc8, 0xa8, 0x33, 0x9c,
}

// helloSniffer watches the bytes a server reads and extracts, from the first
// ClientHello on the wire, the type of its encrypted_client_hello extension.
// crypto/tls does not expose it: a split-mode backend receives a
// ClientHelloInner (type inner) yet reports ECHAccepted=false, so the wire view
// is what tells the test that the front really forwarded an inner hello.
type helloSniffer struct {
	buf    []byte
	done   bool
	echExt *string // "outer", "inner", "invalid", or nil when absent
}

func (s *helloSniffer) feed(p []byte) {
	if s.done {
		return
	}
	s.buf = append(s.buf, p...)
	// Reassemble handshake records until the whole first message is there.
	var msg []byte
	rest := s.buf
	for len(rest) >= recordHeaderLen {
		n := int(binary.BigEndian.Uint16(rest[3:5]))
		if rest[0] != recordHandshake {
			s.finish() // not a plaintext handshake: nothing to report
			return
		}
		if len(rest) < recordHeaderLen+n {
			break
		}
		msg = append(msg, rest[recordHeaderLen:recordHeaderLen+n]...)
		rest = rest[recordHeaderLen+n:]
		if len(msg) >= 4 {
			if total := 4 + (int(msg[1])<<16 | int(msg[2])<<8 | int(msg[3])); len(msg) >= total {
				s.parseClientHello(msg[:total])
				s.finish()
				return
			}
		}
	}
	if len(s.buf) > maxSniffedHello {
		s.finish()
	}
}

func (s *helloSniffer) finish() {
	s.done = true
	s.buf = nil
}

func (s *helloSniffer) parseClientHello(msg []byte) {
	r := &byteReader{b: msg}
	if r.u8() != 1 { // handshake type client_hello
		return
	}
	r.u24()
	r.bytes(2 + 32) // legacy_version, random
	r.vec8()        // legacy_session_id
	r.vec16()       // cipher_suites
	r.vec8()        // legacy_compression_methods
	exts := &byteReader{b: r.vec16()}
	for r.err == nil && exts.err == nil && len(exts.b) > 0 {
		typ := exts.u16()
		data := exts.vec16()
		if typ != extensionECH || exts.err != nil {
			continue
		}
		kind := "invalid"
		if len(data) > 0 && data[0] == 0 {
			kind = "outer"
		} else if len(data) == 1 && data[0] == 1 {
			kind = "inner"
		}
		s.echExt = &kind
		return
	}
}

// sniffConn feeds everything read from a server-side connection to a
// helloSniffer. reader may differ from Conn when a PROXY header was
// consumed through a bufio.Reader that still holds the TLS bytes.
type sniffConn struct {
	net.Conn
	reader io.Reader
	sniff  helloSniffer
	proxy  *proxyHeader
}

func (c *sniffConn) Read(p []byte) (int, error) {
	n, err := c.reader.Read(p)
	c.sniff.feed(p[:n])
	return n, err
}

// handshakeConn is the client-side net.Conn wrapper. During the handshake
// it peeks at the first ServerHello to detect a HelloRetryRequest and, for
// -fragment/-chunk, re-frames every plaintext handshake record into records
// of at most recordSize payload bytes and writes the result to the socket
// chunk bytes at a time, pausing between writes so the peer sees them as
// separate reads. This exercises the peer's ClientHello reassembly.
type handshakeConn struct {
	net.Conn
	recordSize  int  // 0 keeps records whole
	chunk       int  // 0 writes each flight at once
	handshaking bool // cleared once the handshake is over

	// Encrypted TLS 1.2 Finished records also carry content type 22 and must
	// not be split. After the client's ChangeCipherSpec the only plaintext
	// handshake record left is a TLS 1.3 second ClientHello, which follows a
	// HelloRetryRequest, so the first ServerHello tells them apart.
	sentCCS    bool
	serverHRR  bool
	serverHead []byte
}

// serverHelloPeekLen covers record header, handshake header, version and random.
const serverHelloPeekLen = recordHeaderLen + 4 + 2 + 32

func (c *handshakeConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if c.handshaking && len(c.serverHead) < serverHelloPeekLen {
		c.serverHead = append(c.serverHead, p[:min(n, serverHelloPeekLen-len(c.serverHead))]...)
		if len(c.serverHead) == serverHelloPeekLen {
			h := c.serverHead
			c.serverHRR = h[0] == recordHandshake && h[5] == 2 && bytes.Equal(h[11:43], helloRetryRequestRandom)
		}
	}
	return n, err
}

func (c *handshakeConn) Write(p []byte) (int, error) {
	if !c.handshaking || (c.recordSize <= 0 && c.chunk <= 0) {
		return c.Conn.Write(p)
	}
	var out []byte
	rest := p
	// crypto/tls hands whole records to Write; a trailing partial record
	// would be passed through unchanged.
	for len(rest) >= recordHeaderLen {
		n := int(binary.BigEndian.Uint16(rest[3:5]))
		if len(rest) < recordHeaderLen+n {
			break
		}
		record := rest[:recordHeaderLen+n]
		rest = rest[recordHeaderLen+n:]
		switch {
		case record[0] == recordChangeCipherSpec:
			c.sentCCS = true
			out = append(out, record...)
		case record[0] == recordHandshake && (!c.sentCCS || c.serverHRR) && c.recordSize > 0:
			out = appendReframed(out, record, c.recordSize)
		default:
			out = append(out, record...)
		}
	}
	out = append(out, rest...)
	if err := c.writeChunked(out); err != nil {
		return 0, err
	}
	return len(p), nil
}

// appendReframed splits one record's payload into records of at most size
// bytes, each with the original content type and legacy version.
func appendReframed(out, record []byte, size int) []byte {
	payload := record[recordHeaderLen:]
	for len(payload) > 0 {
		n := min(size, len(payload))
		out = append(out, record[0], record[1], record[2], byte(n>>8), byte(n))
		out = append(out, payload[:n]...)
		payload = payload[n:]
	}
	return out
}

// chunkPause spaces chunk writes so that, with TCP_NODELAY (Go's default for
// TCP), they leave as separate segments and reach the peer as separate reads.
const chunkPause = 200 * time.Microsecond

func (c *handshakeConn) writeChunked(b []byte) error {
	if c.chunk <= 0 {
		_, err := c.Conn.Write(b)
		return err
	}
	for off := 0; off < len(b); off += c.chunk {
		if off > 0 {
			time.Sleep(chunkPause)
		}
		if _, err := c.Conn.Write(b[off:min(off+c.chunk, len(b))]); err != nil {
			return err
		}
	}
	return nil
}
