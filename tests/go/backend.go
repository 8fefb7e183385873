package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"
)

const (
	// backendHandshakeTimeout bounds the PROXY header and TLS handshake.
	backendHandshakeTimeout = 30 * time.Second
	// drainTimeout bounds the wait for the peer's FIN after our close_notify.
	drainTimeout = 2 * time.Second
	// shutdownGrace bounds how long a signal waits for open connections.
	shutdownGrace = time.Second
)

// backendReport is what the backend saw on one connection (or HTTP request).
type backendReport struct {
	Backend     string       `json:"backend"`
	SNI         string       `json:"sni"`
	ECHAccepted bool         `json:"ech_accepted"`
	ECHExt      *string      `json:"ech_ext"` // ECH extension type in the first ClientHello on the wire
	ALPN        string       `json:"alpn"`
	Version     string       `json:"version"`
	DidResume   bool         `json:"did_resume"`
	Proxy       *proxyHeader `json:"proxy"`
	Remote      string       `json:"remote"`
	Path        string       `json:"path,omitempty"`
	Proto       string       `json:"proto,omitempty"`
}

type backendError struct {
	Backend string `json:"backend"`
	Error   string `json:"error"`
	Remote  string `json:"remote,omitempty"`
	Fatal   bool   `json:"fatal,omitempty"`
}

type backend struct {
	id            string
	tlsConfig     *tls.Config
	proxyProtocol bool
	idleTimeout   time.Duration
}

func runBackend(args []string) int {
	fs := flag.NewFlagSet("backend", flag.ContinueOnError)
	listen := fs.String("listen", "127.0.0.1:0", "address to listen on")
	var certs, keys, echKeys stringList
	fs.Var(&certs, "cert", "PEM certificate chain file (repeatable, paired with -key)")
	fs.Var(&keys, "key", "PEM private key file (repeatable, paired with -cert)")
	fs.Var(&echKeys, "ech-key", "RFC 9934 PEM file with an ECH private key and ECHConfigList (repeatable)")
	id := fs.String("id", "backend", "identifier echoed in reports")
	curves := fs.String("curves", "", "key exchange groups in preference order, e.g. p256,x25519")
	alpn := fs.String("alpn", "", "ALPN protocols (default none in echo mode, h2,http/1.1 in http mode)")
	echNoRetry := fs.Bool("ech-no-retry", false, "do not send ECH keys as retry configs")
	mode := fs.String("mode", "echo", "echo or http")
	proxyProtocol := fs.Bool("proxy-protocol", false, "require a PROXY protocol v1/v2 header before TLS")
	maxConns := fs.Int("max-conns", 0, "exit after this many connections (0 = unlimited)")
	idleTimeout := fs.Duration("idle-timeout", 2*time.Minute, "per-read idle timeout after the handshake")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	fatal := func(err error) int {
		stdout.write(backendError{Backend: *id, Error: "startup: " + err.Error(), Fatal: true})
		return 2
	}
	if *mode != "echo" && *mode != "http" {
		return fatal(fmt.Errorf("unknown -mode %q", *mode))
	}
	cfg, err := serverTLSConfig(certs, keys, echKeys, !*echNoRetry, *curves)
	if err != nil {
		return fatal(err)
	}
	cfg.NextProtos = splitList(*alpn)
	if *mode == "http" && *alpn == "" {
		cfg.NextProtos = []string{"h2", "http/1.1"}
	}
	b := &backend{id: *id, tlsConfig: cfg, proxyProtocol: *proxyProtocol, idleTimeout: *idleTimeout}

	// Handle signals before announcing the port, so that a test stopping the
	// backend right away still gets a clean exit.
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return fatal(err)
	}
	stdout.printf("LISTENING %s\n", ln.Addr())
	stopping := make(chan struct{})
	stop := sync.OnceFunc(func() {
		close(stopping)
		ln.Close()
	})
	go func() {
		<-signals
		stop()
	}()

	var conns sync.WaitGroup
	serveConn := func(tc *tls.Conn) {
		defer conns.Done()
		b.serveEcho(tc)
	}
	if *mode == "http" {
		var stopHTTP func()
		serveConn, stopHTTP = b.startHTTP(&conns)
		defer stopHTTP()
	}
	status := b.acceptLoop(ln, *maxConns, &conns, serveConn)
	if status != 0 {
		stop()
	}

	done := make(chan struct{})
	go func() {
		conns.Wait()
		close(done)
	}()
	// After -max-conns the last connections may finish (each is bounded by
	// the handshake and idle timeouts); after a signal or an accept error
	// they get a short grace period.
	select {
	case <-done:
	case <-stopping:
		select {
		case <-done:
		case <-time.After(shutdownGrace):
		}
	}
	return status
}

// serverTLSConfig loads the certificate pairs and ECH keys.
func serverTLSConfig(certs, keys, echKeys []string, sendAsRetry bool, curves string) (*tls.Config, error) {
	if len(certs) == 0 || len(certs) != len(keys) {
		return nil, errors.New("need at least one -cert and exactly one -key per -cert")
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	for i := range certs {
		pair, err := tls.LoadX509KeyPair(certs[i], keys[i])
		if err != nil {
			return nil, err
		}
		// With several certificates and no GetCertificate, crypto/tls picks
		// the first one that matches the SNI (falling back to the first).
		cfg.Certificates = append(cfg.Certificates, pair)
	}
	for _, path := range echKeys {
		loaded, err := loadECHKeyFile(path, sendAsRetry)
		if err != nil {
			return nil, err
		}
		cfg.EncryptedClientHelloKeys = append(cfg.EncryptedClientHelloKeys, loaded...)
	}
	var err error
	cfg.CurvePreferences, err = parseCurves(curves)
	return cfg, err
}

// acceptLoop accepts until the listener closes or maxConns (if > 0)
// connections were accepted, handing each handshaken connection to
// serveConn. It returns a non-zero status after an accept error.
func (b *backend) acceptLoop(ln net.Listener, maxConns int, conns *sync.WaitGroup, serveConn func(*tls.Conn)) int {
	defer ln.Close()
	for accepted := 0; maxConns == 0 || accepted < maxConns; accepted++ {
		raw, err := ln.Accept()
		if errors.Is(err, net.ErrClosed) {
			return 0 // a signal closed the listener
		}
		if err != nil {
			stdout.write(backendError{Backend: b.id, Error: "accept: " + err.Error(), Fatal: true})
			return 1
		}
		conns.Add(1)
		go func() {
			tc, err := b.handshake(raw)
			if err != nil {
				stdout.write(backendError{Backend: b.id, Error: err.Error(), Remote: raw.RemoteAddr().String()})
				raw.Close()
				conns.Done()
				return
			}
			serveConn(tc)
		}()
	}
	return 0
}

// handshake reads the optional PROXY header and completes the TLS handshake.
func (b *backend) handshake(raw net.Conn) (*tls.Conn, error) {
	_ = raw.SetDeadline(time.Now().Add(backendHandshakeTimeout))
	conn := &sniffConn{Conn: raw, reader: raw}
	if b.proxyProtocol {
		br := bufio.NewReader(raw)
		h, err := readProxyHeader(br)
		if err != nil {
			return nil, err
		}
		conn.reader, conn.proxy = br, h
	}
	tc := tls.Server(conn, b.tlsConfig)
	if err := tc.Handshake(); err != nil {
		return nil, fmt.Errorf("handshake: %w", err)
	}
	_ = raw.SetDeadline(time.Time{})
	return tc, nil
}

func (b *backend) report(tc *tls.Conn) backendReport {
	cs := tc.ConnectionState()
	conn := tc.NetConn().(*sniffConn)
	return backendReport{
		Backend:     b.id,
		SNI:         cs.ServerName,
		ECHAccepted: cs.ECHAccepted,
		ECHExt:      conn.sniff.echExt,
		ALPN:        cs.NegotiatedProtocol,
		Version:     versionName(cs.Version),
		DidResume:   cs.DidResume,
		Proxy:       conn.proxy,
		Remote:      tc.RemoteAddr().String(),
	}
}

// serveEcho sends the report line, then echoes until the client half-closes,
// answers with close_notify and closes once the client's FIN arrived.
func (b *backend) serveEcho(tc *tls.Conn) {
	defer tc.Close()
	report := b.report(tc)
	stdout.write(report)
	if err := writeJSONLine(tc, report); err != nil {
		b.connError(tc, "echo: ", err)
		return
	}
	buf := make([]byte, 32<<10)
	for {
		_ = tc.SetReadDeadline(time.Now().Add(b.idleTimeout))
		n, err := tc.Read(buf)
		if n > 0 {
			if _, werr := tc.Write(buf[:n]); werr != nil {
				b.connError(tc, "echo: ", werr)
				return
			}
		}
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			b.connError(tc, "echo: ", err)
			return
		}
	}
	if err := tc.CloseWrite(); err != nil {
		b.connError(tc, "echo: close_notify: ", err)
		return
	}
	// Reading the raw socket until the peer's FIN (bounded) keeps our close
	// from racing the client and turning into a reset.
	raw := tc.NetConn()
	_ = raw.SetReadDeadline(time.Now().Add(drainTimeout))
	_, _ = io.Copy(io.Discard, raw)
}

func (b *backend) connError(tc *tls.Conn, prefix string, err error) {
	stdout.write(backendError{Backend: b.id, Error: prefix + err.Error(), Remote: tc.RemoteAddr().String()})
}

func writeJSONLine(w io.Writer, v any) error {
	line, err := jsonMarshalLine(v)
	if err != nil {
		return err
	}
	_, err = w.Write(line)
	return err
}

// connKey carries the *tls.Conn of a request into the HTTP handler.
type connKey struct{}

// startHTTP serves HTTP/1.1 and h2 on connections the accept loop has
// already handshaken (so handshake errors are reported the same way in both
// modes). It returns the function that hands a connection over and a stop
// function. conns is released when net/http is done with a connection.
func (b *backend) startHTTP(conns *sync.WaitGroup) (func(*tls.Conn), func()) {
	ln := &chanListener{conns: make(chan net.Conn), closed: make(chan struct{})}
	srv := &http.Server{
		Handler: http.HandlerFunc(b.serveHTTP),
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			return context.WithValue(ctx, connKey{}, c)
		},
		ConnState: func(c net.Conn, state http.ConnState) {
			if state == http.StateClosed || state == http.StateHijacked {
				conns.Done()
			}
		},
		ReadHeaderTimeout: backendHandshakeTimeout,
		IdleTimeout:       b.idleTimeout,
	}
	// Serve (unlike ServeTLS) does no TLS itself; it sees our *tls.Conn and
	// switches to its HTTP/2 server when ALPN negotiated "h2".
	go func() { _ = srv.Serve(ln) }()
	hand := func(tc *tls.Conn) {
		select {
		case ln.conns <- tc:
		case <-ln.closed:
			tc.Close()
			conns.Done()
		}
	}
	return hand, func() { _ = srv.Close() }
}

func (b *backend) serveHTTP(w http.ResponseWriter, r *http.Request) {
	tc, ok := r.Context().Value(connKey{}).(*tls.Conn)
	if !ok {
		http.Error(w, "not a TLS connection", http.StatusInternalServerError)
		return
	}
	report := b.report(tc)
	report.Path = r.URL.Path
	report.Proto = r.Proto
	stdout.write(report)
	w.Header().Set("Content-Type", "application/json")
	_ = writeJSONLine(w, report)
}

// chanListener is a net.Listener fed by the backend's own accept loop.
type chanListener struct {
	conns     chan net.Conn
	closed    chan struct{}
	closeOnce sync.Once
}

func (l *chanListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.closed:
		return nil, net.ErrClosed
	}
}

func (l *chanListener) Close() error {
	l.closeOnce.Do(func() { close(l.closed) })
	return nil
}

func (l *chanListener) Addr() net.Addr { return &net.TCPAddr{} }
