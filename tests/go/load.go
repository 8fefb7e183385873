package main

// echtest idle: open many TLS connections (optionally with ECH), keep them
// open and idle, and close them all when asked.
//
// It exists for the memory benchmark (benchmarks/frontbench.py): to read a
// front's resident memory per idle relayed connection, all connections must
// be open at the same moment, and the reader must know when that moment is.
// `echtest client -hold` holds each connection for a time counted from its
// own handshake and says nothing until the end; this subcommand ramps the
// connections up with bounded concurrency (so the front's accept queue never
// overflows), prints one JSON line once every attempt is done, then holds
// them all until its standard input yields a line or EOF, SIGTERM/SIGINT
// arrives, or -max-hold elapses. Before closing it checks that each
// connection is still open and prints a second JSON line.
//
// Each connection completes the TLS handshake and reads the backend's report
// line (the echo protocol's first line), so every counted connection was
// relayed end to end; nothing else is sent until the close.

import (
	"bufio"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// aliveProbe is how long the final check waits for a read on each
// connection: an idle connection times out (alive), a closed one returns at
// once.
const aliveProbe = 50 * time.Millisecond

// init dispatches the idle subcommand. main.go's switch is left unchanged
// (it knows backend and client); this runs before main and exits.
func init() {
	if len(os.Args) >= 2 && os.Args[1] == "idle" {
		os.Exit(runIdle(os.Args[2:]))
	}
}

// idleOpened is the line printed once every connection attempt is done.
type idleOpened struct {
	Idle      bool           `json:"idle"`
	Open      int            `json:"open"`
	Failed    int            `json:"failed"`
	ElapsedS  float64        `json:"elapsed_s"`
	Errors    map[string]int `json:"errors"`
	ECHAccept int            `json:"ech_accepted"`
}

// idleClosed is the line printed when the connections are released.
type idleClosed struct {
	Closed  bool    `json:"closed"`
	Alive   int     `json:"alive"`
	Dead    int     `json:"dead"`
	HeldS   float64 `json:"held_s"`
	Release string  `json:"release"` // stdin, signal or max-hold
}

func runIdle(args []string) int {
	fs := flag.NewFlagSet("idle", flag.ContinueOnError)
	addr := fs.String("addr", "", "host:port to connect to")
	name := fs.String("name", "", "TLS server name (the inner name when -ech is given)")
	echB64 := fs.String("ech", "", "ECHConfigList (with length prefix), standard base64")
	caFile := fs.String("ca", "", "root CA PEM file (required unless -insecure)")
	insecure := fs.Bool("insecure", false, "skip certificate verification")
	count := fs.Int("count", 1, "connections to open and hold")
	concurrency := fs.Int("concurrency", 64, "connection attempts in flight while opening")
	timeout := fs.Duration("timeout", 30*time.Second, "per-connection bound on dial, handshake and report line")
	maxHold := fs.Duration("max-hold", 60*time.Second, "release the connections after this long at most")
	if err := fs.Parse(args); err != nil {
		return 2
	}
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
	cfg, err := idleTLSConfig(*name, *echB64, *caFile, *insecure)
	if err != nil {
		return usage(err)
	}

	// Release on a stdin line or EOF, or a signal; -max-hold bounds the rest.
	release := make(chan string, 2)
	go func() {
		_, _ = bufio.NewReader(os.Stdin).ReadString('\n')
		release <- "stdin"
	}()
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-signals
		release <- "signal"
	}()

	start := time.Now()
	conns := make([]*tls.Conn, *count)
	errs := make([]error, *count)
	var next atomic.Int64
	var workers sync.WaitGroup
	for range min(*concurrency, *count) {
		workers.Go(func() {
			for i := int(next.Add(1)) - 1; i < *count; i = int(next.Add(1)) - 1 {
				conns[i], errs[i] = openIdle(*addr, cfg, *timeout)
			}
		})
	}
	workers.Wait()

	opened := idleOpened{Idle: true, Errors: map[string]int{}, ElapsedS: time.Since(start).Seconds()}
	for i, c := range conns {
		if c == nil {
			opened.Failed++
			msg := errs[i].Error()
			if _, seen := opened.Errors[msg]; seen || len(opened.Errors) < maxDistinctErrors {
				opened.Errors[msg]++
			}
			continue
		}
		opened.Open++
		if c.ConnectionState().ECHAccepted {
			opened.ECHAccept++
		}
	}
	stdout.write(opened)

	held := time.Now()
	why := "max-hold"
	select {
	case why = <-release:
	case <-time.After(*maxHold):
	}
	closed := idleClosed{Closed: true, Release: why, HeldS: time.Since(held).Seconds()}
	alive := make([]bool, len(conns))
	var probes sync.WaitGroup
	for i, c := range conns {
		if c != nil {
			probes.Go(func() { alive[i] = stillOpen(c) })
		}
	}
	probes.Wait()
	for i, c := range conns {
		if c == nil {
			continue
		}
		if alive[i] {
			closed.Alive++
		} else {
			closed.Dead++
		}
		_ = c.Close()
	}
	stdout.write(closed)
	if opened.Failed > 0 || closed.Dead > 0 {
		return 1
	}
	return 0
}

// idleTLSConfig builds the client configuration (TLS 1.3 only with ECH).
func idleTLSConfig(name, echB64, caFile string, insecure bool) (*tls.Config, error) {
	cfg := &tls.Config{ServerName: name, InsecureSkipVerify: insecure}
	if echB64 != "" {
		list, err := base64.StdEncoding.DecodeString(echB64)
		if err != nil {
			return nil, fmt.Errorf("-ech: %w", err)
		}
		cfg.EncryptedClientHelloConfigList = list
		cfg.MinVersion = tls.VersionTLS13
	}
	if !insecure {
		if caFile == "" {
			return nil, errors.New("-ca is required unless -insecure")
		}
		pem, err := os.ReadFile(caFile)
		if err != nil {
			return nil, err
		}
		cfg.RootCAs = x509.NewCertPool()
		if !cfg.RootCAs.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("%s: no certificates", caFile)
		}
	}
	return cfg, nil
}

// openIdle dials, handshakes and reads the report line, then clears the
// deadline so the connection can stay idle.
func openIdle(addr string, cfg *tls.Config, timeout time.Duration) (*tls.Conn, error) {
	deadline := time.Now().Add(timeout)
	d := net.Dialer{Deadline: deadline}
	raw, err := d.Dial("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("dial: %w", err)
	}
	_ = raw.SetDeadline(deadline)
	tc := tls.Client(raw, cfg)
	if err := tc.Handshake(); err != nil {
		raw.Close()
		return nil, fmt.Errorf("handshake: %w", err)
	}
	// Read the report line byte by byte: a buffered reader could swallow
	// bytes that belong to nobody, and there are none to expect here.
	var one [1]byte
	for {
		if _, err := tc.Read(one[:]); err != nil {
			tc.Close()
			return nil, fmt.Errorf("report: %w", err)
		}
		if one[0] == '\n' {
			break
		}
	}
	_ = raw.SetDeadline(time.Time{})
	return tc, nil
}

// stillOpen reports whether nothing (no data, no EOF, no reset) arrived on
// an idle connection within aliveProbe.
func stillOpen(tc *tls.Conn) bool {
	_ = tc.SetReadDeadline(time.Now().Add(aliveProbe))
	var one [1]byte
	_, err := tc.Read(one[:])
	var netErr net.Error
	return errors.As(err, &netErr) && netErr.Timeout()
}
