package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"os"
	"reflect"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

const (
	// rawCaptureWait bounds -raw-capture: the peer usually just reads the
	// first flight and never answers.
	rawCaptureWait = 2 * time.Second
	// maxDistinctErrors caps the "errors" map of the summary line.
	maxDistinctErrors = 10
	// maxHTTPBody bounds what -http-get reads.
	maxHTTPBody = 1 << 20
)

type clientOptions struct {
	addr      string
	tlsConfig *tls.Config
	send      int64
	timeout   time.Duration
	hold      time.Duration
	fragment  int
	chunk     int
	httpGet   string
}

// connResult is the per-connection output line.
type connResult struct {
	OK           bool            `json:"ok"`
	ECHAccepted  bool            `json:"ech_accepted"`
	ECHRejected  bool            `json:"ech_rejected"`
	RetryConfigs []byte          `json:"retry_configs"` // base64; null unless the server sent retry configs
	ALPN         string          `json:"alpn"`
	Version      string          `json:"version"`
	DidResume    bool            `json:"did_resume"`
	HelloRetry   bool            `json:"hello_retry"`   // the server answered with a HelloRetryRequest
	ServerReport json.RawMessage `json:"server_report"` // null until read
	HTTPStatus   int             `json:"http_status,omitempty"`
	Sent         int64           `json:"sent"`
	Received     int64           `json:"received"`
	EchoOK       bool            `json:"echo_ok"`
	HandshakeMS  float64         `json:"handshake_ms"`
	Error        *string         `json:"error"`
	Alert        *int            `json:"alert"`
}

func (r *connResult) fail(prefix string, err error) {
	msg := prefix + err.Error()
	r.Error = &msg
	r.OK = false
}

type clientSummary struct {
	Summary     bool           `json:"summary"`
	Total       int            `json:"total"`
	OK          int            `json:"ok"`
	Failed      int            `json:"failed"`
	ECHAccepted int            `json:"ech_accepted"`
	Errors      map[string]int `json:"errors"`
	P50MS       *float64       `json:"p50_ms"`
	P99MS       *float64       `json:"p99_ms"`
}

func runClient(args []string) int {
	fs := flag.NewFlagSet("client", flag.ContinueOnError)
	addr := fs.String("addr", "", "host:port to connect to")
	name := fs.String("name", "", "TLS server name (the inner name when -ech is given)")
	echB64 := fs.String("ech", "", "ECHConfigList (with length prefix), standard base64")
	caFile := fs.String("ca", "", "root CA PEM file (required unless -insecure)")
	insecure := fs.Bool("insecure", false, "skip certificate verification")
	alpn := fs.String("alpn", "", "ALPN protocols, e.g. h2,http/1.1")
	curves := fs.String("curves", "", "key exchange groups in preference order, e.g. x25519,p256")
	minVersion := fs.String("min-version", "", "1.2 or 1.3 (default 1.3 with -ech, else 1.2)")
	maxVersion := fs.String("max-version", "", "1.2 or 1.3 (default 1.3)")
	resume := fs.Bool("resume", false, "share a session cache between connections to allow resumption")
	send := fs.Int64("send", 0, "random bytes to upload and expect echoed")
	count := fs.Int("count", 1, "number of connections")
	concurrency := fs.Int("concurrency", 1, "connections in flight")
	duration := fs.Duration("duration", 0, "keep connecting until this elapsed (bounded by -count if given)")
	timeout := fs.Duration("timeout", 10*time.Second, "per-connection timeout (excluding -hold)")
	fragment := fs.Int("fragment", 0, "re-frame handshake records to at most this many payload bytes")
	chunk := fs.Int("chunk", 0, "write handshake bytes to the socket this many bytes at a time")
	hold := fs.Duration("hold", 0, "keep the connection idle this long after the handshake")
	httpGet := fs.String("http-get", "", "send an HTTP GET for this path instead of the echo protocol")
	rawCapture := fs.Bool("raw-capture", false, "send the first flight, wait briefly, exit 0 whatever happens")
	quiet := fs.Bool("quiet", false, "with -count/-duration, print only the summary line")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	explicit := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { explicit[f.Name] = true })

	usage := func(err error) int {
		stdout.write(map[string]any{"ok": false, "error": "usage: " + err.Error()})
		return 2
	}
	if *addr == "" {
		return usage(errors.New("-addr is required"))
	}
	if *count < 1 || *concurrency < 1 {
		return usage(errors.New("-count and -concurrency must be at least 1"))
	}
	cfg := &tls.Config{ServerName: *name, InsecureSkipVerify: *insecure, NextProtos: splitList(*alpn)}
	var err error
	if cfg.CurvePreferences, err = parseCurves(*curves); err != nil {
		return usage(err)
	}
	if cfg.MinVersion, err = parseVersion(*minVersion); err != nil {
		return usage(err)
	}
	if cfg.MaxVersion, err = parseVersion(*maxVersion); err != nil {
		return usage(err)
	}
	if *echB64 != "" {
		if cfg.EncryptedClientHelloConfigList, err = base64.StdEncoding.DecodeString(*echB64); err != nil {
			return usage(fmt.Errorf("-ech: %w", err))
		}
		if cfg.MinVersion == 0 {
			cfg.MinVersion = tls.VersionTLS13 // crypto/tls refuses ECH otherwise
		}
	}
	if !*insecure {
		if *caFile == "" {
			return usage(errors.New("-ca is required unless -insecure"))
		}
		pem, err := os.ReadFile(*caFile)
		if err != nil {
			return usage(err)
		}
		cfg.RootCAs = x509.NewCertPool()
		if !cfg.RootCAs.AppendCertsFromPEM(pem) {
			return usage(fmt.Errorf("%s: no certificates", *caFile))
		}
	}
	if *resume {
		cfg.ClientSessionCache = tls.NewLRUClientSessionCache(64)
	}
	opts := &clientOptions{
		addr: *addr, tlsConfig: cfg, send: *send, timeout: *timeout, hold: *hold,
		fragment: *fragment, chunk: *chunk, httpGet: *httpGet,
	}

	if *rawCapture {
		stdout.write(opts.rawCaptureOnce())
		return 0
	}

	// Without -count, -duration alone loops until the time is up.
	limit := *count
	if *duration > 0 && !explicit["count"] {
		limit = math.MaxInt
	}
	withSummary := explicit["count"] || explicit["duration"]
	return opts.run(limit, *concurrency, *duration, withSummary, withSummary && *quiet)
}

// run makes up to limit connections (fewer if duration elapses first),
// concurrency at a time, prints their results and optionally a summary.
// The exit status is 0 only if every connection was ok.
func (o *clientOptions) run(limit, concurrency int, duration time.Duration, withSummary, quiet bool) int {
	var stopAt time.Time
	if duration > 0 {
		stopAt = time.Now().Add(duration)
	}
	results := make(chan connResult)
	var started atomic.Int64
	var workers sync.WaitGroup
	for range min(concurrency, limit) {
		workers.Go(func() {
			for started.Add(1) <= int64(limit) && (stopAt.IsZero() || time.Now().Before(stopAt)) {
				results <- o.connectOnce()
			}
		})
	}
	go func() {
		workers.Wait()
		close(results)
	}()

	summary := clientSummary{Summary: true, Errors: map[string]int{}}
	var handshakeMS []float64
	for r := range results {
		if !quiet {
			stdout.write(r)
		}
		summary.Total++
		if r.OK {
			summary.OK++
			handshakeMS = append(handshakeMS, r.HandshakeMS)
		} else {
			summary.Failed++
		}
		if r.ECHAccepted {
			summary.ECHAccepted++
		}
		if r.Error != nil {
			if _, seen := summary.Errors[*r.Error]; seen || len(summary.Errors) < maxDistinctErrors {
				summary.Errors[*r.Error]++
			}
		}
	}
	if withSummary {
		summary.P50MS = percentile(handshakeMS, 50)
		summary.P99MS = percentile(handshakeMS, 99)
		stdout.write(summary)
	}
	if summary.Total == 0 || summary.Failed > 0 {
		return 1
	}
	return 0
}

// percentile is the nearest-rank percentile, nil for no samples.
func percentile(samples []float64, p float64) *float64 {
	if len(samples) == 0 {
		return nil
	}
	sorted := slices.Sorted(slices.Values(samples))
	rank := int(math.Ceil(p / 100 * float64(len(sorted))))
	v := sorted[max(rank, 1)-1]
	return &v
}

// dial opens the TCP connection, wrapped to watch (and for -fragment/-chunk
// reshape) the handshake.
func (o *clientOptions) dial(deadline time.Time) (*handshakeConn, error) {
	d := net.Dialer{Deadline: deadline}
	raw, err := d.Dial("tcp", o.addr)
	if err != nil {
		return nil, err
	}
	_ = raw.SetDeadline(deadline)
	return &handshakeConn{Conn: raw, recordSize: o.fragment, chunk: o.chunk, handshaking: true}, nil
}

// connectOnce runs one connection: handshake, optional hold, then the echo
// protocol or an HTTP GET. Every step is bounded by the connection deadline.
func (o *clientOptions) connectOnce() (r connResult) {
	deadline := time.Now().Add(o.timeout + o.hold)
	conn, err := o.dial(deadline)
	if err != nil {
		r.fail("dial: ", err)
		return r
	}
	tc := tls.Client(conn, o.tlsConfig)
	defer tc.Close()

	start := time.Now()
	err = tc.Handshake()
	r.HandshakeMS = float64(time.Since(start).Microseconds()) / 1000
	conn.handshaking = false
	r.HelloRetry = conn.serverHRR
	if err != nil {
		r.fail("handshake: ", err)
		var rejection *tls.ECHRejectionError
		if errors.As(err, &rejection) {
			r.ECHRejected = true
			r.RetryConfigs = rejection.RetryConfigList
		}
		r.Alert = receivedAlert(err)
		return r
	}
	cs := tc.ConnectionState()
	r.ECHAccepted = cs.ECHAccepted
	r.ALPN = cs.NegotiatedProtocol
	r.Version = versionName(cs.Version)
	r.DidResume = cs.DidResume

	if o.httpGet != "" {
		time.Sleep(o.hold)
		o.httpExchange(tc, &r)
	} else {
		o.echoExchange(tc, &r)
	}
	return r
}

// echoExchange reads the backend's report line, then uploads -send random
// bytes and half-closes while reading the echo until EOF, comparing hashes.
func (o *clientOptions) echoExchange(tc *tls.Conn, r *connResult) {
	br := bufio.NewReader(tc)
	line, err := br.ReadBytes('\n')
	if err != nil {
		r.fail("report: ", err)
		r.Alert = receivedAlert(err)
		return
	}
	if !json.Valid(line) {
		r.fail("report: ", fmt.Errorf("not JSON: %q", line))
		return
	}
	r.ServerReport = json.RawMessage(bytes.TrimSpace(line))
	time.Sleep(o.hold)

	type upload struct {
		sum  []byte
		sent int64
		err  error
	}
	uploaded := make(chan upload, 1)
	go func() {
		h := sha256.New()
		buf := make([]byte, 32<<10)
		var sent int64
		for sent < o.send {
			chunk := buf[:min(int64(len(buf)), o.send-sent)]
			_, _ = rand.Read(chunk)
			h.Write(chunk)
			n, err := tc.Write(chunk)
			sent += int64(n)
			if err != nil {
				uploaded <- upload{sent: sent, err: err}
				return
			}
		}
		uploaded <- upload{sum: h.Sum(nil), sent: sent, err: tc.CloseWrite()}
	}()
	h := sha256.New()
	received, readErr := io.Copy(h, br)
	up := <-uploaded
	r.Sent, r.Received = up.sent, received
	switch {
	case up.err != nil:
		r.fail("echo: send: ", up.err)
	case readErr != nil:
		r.fail("echo: receive: ", readErr)
		r.Alert = receivedAlert(readErr)
	case received != up.sent || !bytes.Equal(h.Sum(nil), up.sum):
		r.fail("echo: ", fmt.Errorf("echoed %d bytes do not match the %d sent", received, up.sent))
	default:
		r.EchoOK = true
		r.OK = true
	}
}

// httpExchange sends one GET over the established connection with
// net/http, which speaks h2 when ALPN chose it and HTTP/1.1 otherwise.
func (o *clientOptions) httpExchange(tc *tls.Conn, r *connResult) {
	var used atomic.Bool
	transport := &http.Transport{
		DialTLSContext: func(context.Context, string, string) (net.Conn, error) {
			if used.Swap(true) {
				return nil, errors.New("connection already used")
			}
			return tc, nil
		},
		ForceAttemptHTTP2: true, // needed for h2 with a custom DialTLSContext
	}
	defer transport.CloseIdleConnections()
	host := o.tlsConfig.ServerName
	if host == "" {
		host = o.addr
	}
	resp, err := (&http.Client{Transport: transport}).Get("https://" + host + o.httpGet)
	if err != nil {
		r.fail("http: ", err)
		return
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxHTTPBody))
	if err != nil {
		r.fail("http: ", err)
		return
	}
	r.HTTPStatus = resp.StatusCode
	body = bytes.TrimSpace(body)
	if !json.Valid(body) {
		// Keep non-JSON bodies visible as a JSON string.
		body, _ = json.Marshal(string(body))
	}
	r.ServerReport = body
	r.OK = resp.StatusCode == http.StatusOK
	if !r.OK {
		r.fail("http: ", errors.New(resp.Status))
	}
}

// rawCaptureResult is the single line -raw-capture prints.
type rawCaptureResult struct {
	RawCapture bool    `json:"raw_capture"`
	Error      *string `json:"error"`
}

// rawCaptureOnce sends the first flight to a capturing peer and gives up
// after a short wait; the handshake outcome is irrelevant.
func (o *clientOptions) rawCaptureOnce() rawCaptureResult {
	res := rawCaptureResult{RawCapture: true}
	conn, err := o.dial(time.Now().Add(min(o.timeout, rawCaptureWait)))
	if err == nil {
		tc := tls.Client(conn, o.tlsConfig)
		err = tc.Handshake()
		tc.Close()
	}
	if err != nil {
		msg := err.Error()
		res.Error = &msg
	}
	return res
}

// receivedAlert returns the number of a TLS alert received from the peer.
// crypto/tls reports a received alert as a *net.OpError with Op "remote
// error" wrapping its unexported alert type (a uint8), so reflection reads the
// number. tls.AlertError does not help here: crypto/tls only wraps it around
// alerts it sent itself on QUIC connections.
func receivedAlert(err error) *int {
	var op *net.OpError
	if errors.As(err, &op) && op.Op == "remote error" && op.Err != nil {
		if v := reflect.ValueOf(op.Err); v.Kind() == reflect.Uint8 {
			n := int(v.Uint())
			return &n
		}
	}
	return nil
}
