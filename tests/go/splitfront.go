package main

// echtest split-front: a minimal split-mode ECH front in compiled Go, the
// reference benchmarks/frontbench.py's "go-split" front measures echfront
// against ("a per-connection cost near the compiled fronts").
//
// Per connection it does what a split-mode front must and nothing more:
// read the first ClientHello (whole records, up to the end of the
// handshake message), find its outer "encrypted_client_hello" extension
// (RFC 9849 §5), open the payload with the configured key (crypto/hpke,
// RFC 9180 base mode, info "tls ech" 0x00 ECHConfig, AAD the
// ClientHelloOuter with the payload zeroed, §5.2), rebuild the
// ClientHelloInner from the EncodedClientHelloInner (the outer
// legacy_session_id copied in, ech_outer_extensions expanded, §5.1),
// connect to the one backend, send it the inner hello and then relay both
// ways with half-close, a goroutine and a 16 KiB buffer per direction.
//
// It is a benchmark peer, not a front: it routes everything to one
// backend, closes on any error without an alert, does not handle a
// HelloRetryRequest's second ClientHello, and logs nothing.

import (
	"bytes"
	"crypto/hpke"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"time"
)

const (
	extensionECHOuterExtensions = 0xfd00
	maxSplitFrontHelloBytes     = 1 << 16
)

// splitFrontKey is one ECHConfig and its HPKE private key.
type splitFrontKey struct {
	config  []byte
	private hpke.PrivateKey
}

func init() {
	if len(os.Args) >= 2 && os.Args[1] == "split-front" {
		os.Exit(runSplitFront(os.Args[2:]))
	}
}

func runSplitFront(args []string) int {
	fs := flag.NewFlagSet("split-front", flag.ContinueOnError)
	listen := fs.String("listen", "127.0.0.1:0", "address to listen on")
	backend := fs.String("backend", "", "host:port every connection is relayed to")
	timeout := fs.Duration("timeout", 10*time.Second, "bound on reading the first ClientHello")
	var keyFiles stringList
	fs.Var(&keyFiles, "ech-key", "RFC 9934 PEM file with an ECH private key and ECHConfigList (repeatable)")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	keys, err := loadSplitFrontKeys(keyFiles)
	if err == nil && *backend == "" {
		err = errors.New("-backend is required")
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "split-front:", err)
		return 2
	}
	ln, err := listenAnnounced(*listen)
	if err != nil {
		fmt.Fprintln(os.Stderr, "split-front:", err)
		return 1
	}
	for {
		conn, err := ln.Accept()
		if err != nil {
			var transient interface{ Temporary() bool }
			if errors.As(err, &transient) && transient.Temporary() {
				time.Sleep(5 * time.Millisecond)
				continue
			}
			return 0
		}
		go serveSplit(conn.(*net.TCPConn), keys, *backend, *timeout)
	}
}

func loadSplitFrontKeys(paths []string) (map[byte]splitFrontKey, error) {
	if len(paths) == 0 {
		return nil, errors.New("at least one -ech-key is required")
	}
	keys := map[byte]splitFrontKey{}
	for _, path := range paths {
		pairs, err := readECHKeyFile(path)
		if err != nil {
			return nil, err
		}
		for _, pair := range pairs {
			kem, err := hpke.NewKEM(pair.config.kemID)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", path, err)
			}
			private, err := kem.NewPrivateKey(pair.private)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", path, err)
			}
			keys[pair.config.configID] = splitFrontKey{config: pair.config.raw, private: private}
		}
	}
	return keys, nil
}

func serveSplit(client *net.TCPConn, keys map[byte]splitFrontKey, backendAddr string, timeout time.Duration) {
	defer client.Close()
	_ = client.SetReadDeadline(time.Now().Add(timeout))
	recordVersion, outer, err := readClientHello(client)
	if err != nil {
		return
	}
	inner, err := decryptInner(outer, keys)
	if err != nil {
		return
	}
	_ = client.SetReadDeadline(time.Time{})
	conn, err := net.Dial("tcp", backendAddr)
	if err != nil {
		return
	}
	backend := conn.(*net.TCPConn)
	defer backend.Close()
	var records []byte
	for rest := inner; len(rest) > 0; {
		n := min(len(rest), 1<<14)
		records = append(records, recordHandshake, byte(recordVersion>>8), byte(recordVersion), byte(n>>8), byte(n))
		records = append(records, rest[:n]...)
		rest = rest[n:]
	}
	if _, err := backend.Write(records); err != nil {
		return
	}
	done := make(chan struct{})
	go func() {
		copyPlain(backend, client)
		_ = backend.CloseWrite()
		close(done)
	}()
	copyPlain(client, backend)
	_ = client.CloseWrite()
	<-done
}

// copyPlain relays src to dst through a 16 KiB buffer.  Hiding the TCP
// types from io.Copy keeps it from splice(2), whose pooled pipes would
// hold file descriptors after the connection (the benchmark waits for a
// front's descriptors to settle) and which frontbench's haproxy does not
// use either (no "option splice-auto").
func copyPlain(dst, src *net.TCPConn) {
	buf := make([]byte, 16<<10)
	_, _ = io.CopyBuffer(struct{ io.Writer }{dst}, struct{ io.Reader }{src}, buf)
}

// readClientHello reads handshake records until one whole ClientHello is
// in (split-front, and replay-backend for the one a front forwards); it
// returns the first record's legacy_record_version and the message.
func readClientHello(conn net.Conn) (uint16, []byte, error) {
	header := make([]byte, recordHeaderLen)
	var version uint16
	var message []byte
	for {
		if _, err := io.ReadFull(conn, header); err != nil {
			return 0, nil, err
		}
		if header[0] != recordHandshake {
			return 0, nil, errors.New("not a handshake record")
		}
		if version == 0 {
			version = binary.BigEndian.Uint16(header[1:3])
		}
		body := make([]byte, binary.BigEndian.Uint16(header[3:5]))
		if _, err := io.ReadFull(conn, body); err != nil {
			return 0, nil, err
		}
		message = append(message, body...)
		if len(message) > maxSplitFrontHelloBytes {
			return 0, nil, errors.New("ClientHello too long")
		}
		if len(message) >= 4 {
			want := 4 + (int(message[1])<<16 | int(message[2])<<8 | int(message[3]))
			if len(message) == want && message[0] == 1 {
				return version, message, nil
			}
			if len(message) > want || message[0] != 1 {
				return 0, nil, errors.New("not one ClientHello")
			}
		}
	}
}

// helloFields is a ClientHello body cut into its fields (RFC 8446 §4.1.2).
type helloFields struct {
	sessionID  []byte
	afterSID   int // offset of cipher_suites
	extensions int // offset of the extensions' length
	exts       []helloExtension
}

type helloExtension struct {
	typ        uint16
	start, end int // the whole extension (type, length, data)
}

var errMalformedHello = errors.New("malformed ClientHello")

func parseHelloBody(body []byte) (*helloFields, error) {
	r := &byteReader{b: body}
	offset := func() int { return len(body) - len(r.b) }
	r.bytes(2 + 32) // legacy_version, random
	h := &helloFields{sessionID: r.vec8()}
	h.afterSID = offset()
	r.vec16() // cipher_suites
	r.vec8()  // legacy_compression_methods
	h.extensions = offset()
	block := r.vec16()
	if r.err != nil {
		return nil, errMalformedHello
	}
	// Offsets into body: the block starts after its 2-byte length.
	exts := &byteReader{b: block}
	blockEnd := h.extensions + 2 + len(block)
	for len(exts.b) > 0 {
		start := blockEnd - len(exts.b)
		typ := exts.u16()
		exts.vec16()
		if exts.err != nil {
			return nil, errMalformedHello
		}
		h.exts = append(h.exts, helloExtension{uint16(typ), start, blockEnd - len(exts.b)})
	}
	return h, nil
}

// decryptInner opens the outer hello's ECH payload and returns the
// ClientHelloInner message (handshake header included).
func decryptInner(message []byte, keys map[byte]splitFrontKey) ([]byte, error) {
	body := message[4:]
	outer, err := parseHelloBody(body)
	if err != nil {
		return nil, err
	}
	var ech *helloExtension
	for i := range outer.exts {
		if outer.exts[i].typ == extensionECH {
			ech = &outer.exts[i]
		}
	}
	if ech == nil {
		return nil, errors.New("no ECH")
	}
	// ECHClientHello (outer): type, kdf_id, aead_id, config_id, enc, payload.
	r := &byteReader{b: body[ech.start+4 : ech.end]}
	kind, kdfID, aeadID, configID := r.u8(), r.u16(), r.u16(), r.u8()
	enc, payload := r.vec16(), r.vec16()
	if r.err != nil || len(r.b) != 0 || kind != 0 {
		return nil, errMalformedHello
	}
	key, ok := keys[byte(configID)]
	if !ok {
		return nil, errors.New("unknown config_id")
	}
	kdf, err := hpke.NewKDF(uint16(kdfID))
	if err != nil {
		return nil, err
	}
	aead, err := hpke.NewAEAD(uint16(aeadID))
	if err != nil {
		return nil, err
	}
	info := append([]byte("tls ech\x00"), key.config...)
	recipient, err := hpke.NewRecipient(enc, key.private, kdf, aead, info)
	if err != nil {
		return nil, err
	}
	// The AAD is the outer hello with the payload, the extension's last field, zeroed.
	aad := bytes.Clone(body)
	clear(aad[ech.end-len(payload) : ech.end])
	encoded, err := recipient.Open(aad, payload)
	if err != nil {
		return nil, err
	}
	return rebuildInner(encoded, body, outer)
}

// rebuildInner turns an EncodedClientHelloInner into the ClientHelloInner
// message (RFC 9849 §5.1).
func rebuildInner(encoded, outerBody []byte, outer *helloFields) ([]byte, error) {
	fields, err := parseHelloBody(encoded)
	if err != nil || len(fields.sessionID) != 0 {
		return nil, errMalformedHello
	}
	inner := make([]byte, 0, len(encoded)+len(outerBody))
	inner = append(inner, encoded[:34]...)
	inner = append(inner, byte(len(outer.sessionID)))
	inner = append(inner, outer.sessionID...)
	inner = append(inner, encoded[fields.afterSID:fields.extensions]...)
	lengthAt := len(inner)
	inner = append(inner, 0, 0)
	cursor := 0
	for _, ext := range fields.exts {
		if ext.typ != extensionECHOuterExtensions {
			inner = append(inner, encoded[ext.start:ext.end]...)
			continue
		}
		list := encoded[ext.start+4 : ext.end]
		if len(list) < 1 || int(list[0]) != len(list)-1 || list[0]%2 != 0 {
			return nil, errMalformedHello
		}
		for i := 1; i < len(list); i += 2 {
			want := binary.BigEndian.Uint16(list[i:])
			if want == extensionECH {
				return nil, errMalformedHello
			}
			for cursor < len(outer.exts) && outer.exts[cursor].typ != want {
				cursor++
			}
			if cursor == len(outer.exts) {
				return nil, errMalformedHello
			}
			inner = append(inner, outerBody[outer.exts[cursor].start:outer.exts[cursor].end]...)
			cursor++
		}
	}
	binary.BigEndian.PutUint16(inner[lengthAt:], uint16(len(inner)-lengthAt-2))
	header := []byte{1, byte(len(inner) >> 16), byte(len(inner) >> 8), byte(len(inner))}
	return append(header, inner...), nil
}
