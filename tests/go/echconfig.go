package main

import (
	"bytes"
	"crypto/ecdh"
	"crypto/ecdsa"
	"crypto/hpke"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/binary"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
)

// echConfigVersion is the ECHConfig version of RFC 9849 (draft -13 onwards).
const echConfigVersion = 0xfe0d

// HPKE KEM ids (RFC 9180) of the curve keys crypto/x509 parses from PKCS#8.
var kemForCurve = map[ecdh.Curve]uint16{
	ecdh.X25519(): 0x0020,
	ecdh.P256():   0x0010,
	ecdh.P384():   0x0011,
	ecdh.P521():   0x0012,
}

// echConfig is the part of a parsed ECHConfig that key matching needs.
type echConfig struct {
	raw       []byte // the whole ECHConfig (version, length, contents), as Go wants it
	configID  byte
	kemID     uint16
	publicKey []byte
}

// byteReader is a minimal big-endian reader for TLS presentation-language
// structures (crypto/tls uses x/crypto/cryptobyte, which is not importable).
type byteReader struct {
	b   []byte
	err error
}

func (r *byteReader) bytes(n int) []byte {
	if r.err != nil || n > len(r.b) {
		r.err = errors.New("truncated")
		return nil
	}
	out := r.b[:n]
	r.b = r.b[n:]
	return out
}

func (r *byteReader) u8() int {
	if b := r.bytes(1); b != nil {
		return int(b[0])
	}
	return 0
}

func (r *byteReader) u16() int {
	if b := r.bytes(2); b != nil {
		return int(binary.BigEndian.Uint16(b))
	}
	return 0
}

func (r *byteReader) u24() int {
	if b := r.bytes(3); b != nil {
		return int(b[0])<<16 | int(b[1])<<8 | int(b[2])
	}
	return 0
}

// vec8 and vec16 read a 1- or 2-byte length prefixed vector.
func (r *byteReader) vec8() []byte  { return r.bytes(r.u8()) }
func (r *byteReader) vec16() []byte { return r.bytes(r.u16()) }

// parseECHConfigList splits an ECHConfigList (with its 2-byte length prefix)
// into ECHConfigs, skipping versions other than 0xfe0d as RFC 9849 requires.
func parseECHConfigList(list []byte) ([]echConfig, error) {
	outer := &byteReader{b: list}
	body := outer.vec16()
	if outer.err != nil || len(outer.b) != 0 {
		return nil, errors.New("ECHConfigList: bad length prefix")
	}
	r := &byteReader{b: body}
	var configs []echConfig
	for len(r.b) > 0 {
		start := r.b
		version := r.u16()
		contents := r.vec16()
		if r.err != nil {
			return nil, fmt.Errorf("ECHConfigList: %w", r.err)
		}
		if version != echConfigVersion {
			continue
		}
		c := &byteReader{b: contents}
		configID := c.u8()
		kem := c.u16()
		pub := c.vec16()
		c.vec16() // cipher_suites
		c.u8()    // maximum_name_length
		c.vec8()  // public_name
		c.vec16() // extensions
		if c.err != nil || len(c.b) != 0 {
			return nil, errors.New("ECHConfig: malformed contents")
		}
		configs = append(configs, echConfig{
			raw:       bytes.Clone(start[:4+len(contents)]),
			configID:  byte(configID),
			kemID:     uint16(kem),
			publicKey: pub,
		})
	}
	return configs, nil
}

// echPrivateKey is an ECH private key as tls.EncryptedClientHelloKey takes it
// (HPKE SerializePrivateKey), with its KEM id and public key for matching
// against ECHConfigs.
type echPrivateKey struct {
	kemID   uint16
	private []byte
	public  []byte
}

// echKeyPair is one ECHConfig of a key file and the private key that opens it.
type echKeyPair struct {
	config  echConfig
	private []byte // HPKE SerializePrivateKey
}

// readECHKeyFile reads an RFC 9934 PEM file (PRIVATE KEY + ECHCONFIG) and
// returns every ECHConfig matching the private key, with the key.
func readECHKeyFile(path string) ([]echKeyPair, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var priv *echPrivateKey
	var configs []echConfig
	for {
		var block *pem.Block
		block, data = pem.Decode(data)
		if block == nil {
			break
		}
		switch block.Type {
		case "PRIVATE KEY":
			if priv, err = parseECHPrivateKey(block.Bytes); err != nil {
				return nil, fmt.Errorf("%s: %w", path, err)
			}
		case "ECHCONFIG":
			more, err := parseECHConfigList(block.Bytes)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", path, err)
			}
			configs = append(configs, more...)
		}
	}
	if priv == nil || len(configs) == 0 {
		return nil, fmt.Errorf("%s: need a PRIVATE KEY and an ECHCONFIG block", path)
	}
	var pairs []echKeyPair
	for _, c := range configs {
		if c.kemID == priv.kemID && bytes.Equal(c.publicKey, priv.public) {
			pairs = append(pairs, echKeyPair{config: c, private: priv.private})
		}
	}
	if len(pairs) == 0 {
		return nil, fmt.Errorf("%s: no ECHConfig matches the private key", path)
	}
	return pairs, nil
}

// loadECHKeyFile is readECHKeyFile's pairs as crypto/tls server keys.
func loadECHKeyFile(path string, sendAsRetry bool) ([]tls.EncryptedClientHelloKey, error) {
	pairs, err := readECHKeyFile(path)
	if err != nil {
		return nil, err
	}
	keys := make([]tls.EncryptedClientHelloKey, len(pairs))
	for i, pair := range pairs {
		keys[i] = tls.EncryptedClientHelloKey{
			Config:      pair.config.raw,
			PrivateKey:  pair.private,
			SendAsRetry: sendAsRetry,
		}
	}
	return keys, nil
}

// oidXWing identifies an MLKEM768-X25519 (X-Wing) key
// (draft-connolly-cfrg-xwing-kem, section 5.8). crypto/x509 does not know it.
var oidXWing = asn1.ObjectIdentifier{1, 3, 6, 1, 4, 1, 62253, 25722}

// oneAsymmetricKey is the RFC 5958 structure without its optional fields,
// which an X-Wing key must not carry.
type oneAsymmetricKey struct {
	Version    int
	Algorithm  pkix.AlgorithmIdentifier
	PrivateKey []byte
}

// parseECHPrivateKey accepts an X-Wing key (the post-quantum ECH KEM), an
// X25519 key (the usual one) or a NIST curve key, as PKCS#8 DER.
func parseECHPrivateKey(der []byte) (*echPrivateKey, error) {
	var oak oneAsymmetricKey
	rest, err := asn1.Unmarshal(der, &oak)
	if err == nil && len(rest) == 0 && oak.Algorithm.Algorithm.Equal(oidXWing) {
		return parseXWingKey(oak)
	}
	key, err := x509.ParsePKCS8PrivateKey(der)
	if err != nil {
		return nil, err
	}
	var priv *ecdh.PrivateKey
	switch k := key.(type) {
	case *ecdh.PrivateKey:
		priv = k
	case *ecdsa.PrivateKey:
		if priv, err = k.ECDH(); err != nil {
			return nil, err
		}
	default:
		return nil, fmt.Errorf("unsupported ECH private key type %T", key)
	}
	return &echPrivateKey{
		kemID:   kemForCurve[priv.Curve()],
		private: priv.Bytes(),
		public:  priv.PublicKey().Bytes(),
	}, nil
}

// parseXWingKey checks the exact shape draft-connolly-cfrg-xwing-kem
// section 5.8.2 specifies (version 0, absent parameters, a 32-byte seed) and
// derives the public key with crypto/hpke, so a key file whose ECHConfig
// holds a public key Go does not derive from the seed fails to load.
func parseXWingKey(oak oneAsymmetricKey) (*echPrivateKey, error) {
	if oak.Version != 0 || len(oak.Algorithm.Parameters.FullBytes) != 0 || len(oak.PrivateKey) != 32 {
		return nil, errors.New("malformed X-Wing private key")
	}
	kem := hpke.MLKEM768X25519()
	priv, err := kem.NewPrivateKey(oak.PrivateKey)
	if err != nil {
		return nil, err
	}
	return &echPrivateKey{
		kemID:   kem.ID(),
		private: bytes.Clone(oak.PrivateKey),
		public:  priv.PublicKey().Bytes(),
	}, nil
}
