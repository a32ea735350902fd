/*
 * pal_crypto.h - the crypto port of the PALISADE device peer (pal_device.c).
 *
 * pal_device.c implements no cryptographic primitive. Every primitive it needs is one of the
 * functions below, all named pal_crypto_*, which the firmware binds to a library it already
 * has (firmware_bridge/DEVICE.md maps them onto mlkem-native, mldsa-native, pqm4, wolfCrypt,
 * Monocypher and libtomcrypt). The host test build binds them to Python's `cryptography`
 * (pyx/palisade_c/device.pyx).
 *
 * Conventions, for every function (fixed sizes are the PAL_* constants below; the prototypes
 * use plain pointers so that any port's declarations match them):
 *   - `port` is the opaque pointer the firmware put in pal_device_config.port (may be NULL);
 *     the core only passes it through.
 *   - A return of 0 means success; anything else is failure. A failure of a peer-facing check
 *     (bad ciphertext, bad signature, bad tag, invalid public key) must return non-zero, never
 *     abort or trap: the core turns it into the protocol's error code.
 *   - Buffers never overlap unless the comment says so.
 *   - Every function is called from the thread that calls the pal_device_* entry points.
 */
#ifndef PAL_CRYPTO_H
#define PAL_CRYPTO_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* FIPS 203 (ML-KEM-768) and FIPS 204 (ML-DSA-65) sizes. */
#define PAL_MLKEM768_PK_BYTES 1184u
#define PAL_MLKEM768_CT_BYTES 1088u
#define PAL_MLKEM_SS_BYTES 32u
/* Room for the port's decapsulation key: the FIPS 203 expanded form is 2400 bytes. A port
 * that keeps only the 64-byte seed (d || z) may define a smaller value before including this
 * header, in every translation unit. */
#ifndef PAL_MLKEM768_SK_BYTES
#define PAL_MLKEM768_SK_BYTES 2400u
#endif
#define PAL_MLDSA65_PK_BYTES 1952u
#define PAL_MLDSA65_SIG_BYTES 3309u
#define PAL_SHA3_256_BYTES 32u
#define PAL_AEAD_KEY_BYTES 32u
#define PAL_AEAD_NONCE_BYTES 12u
#define PAL_AEAD_TAG_BYTES 16u

/* Storage of one incremental SHA3-256 computation. The port decides what it holds (a Keccak
 * state is 200 bytes plus a position); the core only allocates it and passes it back. */
#ifndef PAL_CRYPTO_SHA3_CTX_BYTES
#define PAL_CRYPTO_SHA3_CTX_BYTES 224u
#endif
typedef struct pal_sha3_ctx {
    union {
        uint64_t align_u64;
        void *align_ptr;
        uint8_t bytes[PAL_CRYPTO_SHA3_CTX_BYTES];
    } u;
} pal_sha3_ctx;

/* n bytes from a cryptographically secure generator (nonces, RIDs, KEM key generation). */
int pal_crypto_random(void *port, uint8_t *out, size_t n);

/* ML-KEM-768 (FIPS 203). keygen makes an ephemeral key pair; encaps fails (non-zero) when `pk`
 * is not a valid encapsulation key (FIPS 203 input check); decaps returns the shared secret
 * (implicit rejection gives a pseudo-random one, which is success). */
int pal_crypto_mlkem768_keygen(void *port, uint8_t *pk,
                               uint8_t *sk);
int pal_crypto_mlkem768_encaps(void *port, const uint8_t *pk,
                               uint8_t *ct,
                               uint8_t *ss);
int pal_crypto_mlkem768_decaps(void *port, const uint8_t *sk,
                               const uint8_t *ct,
                               uint8_t *ss);

/* ML-DSA-65 (FIPS 204, pure mode with a context string of at most 255 bytes). `sk` is the
 * device's identity key in whatever form the port stores it (seed or expanded), as supplied
 * in pal_device_config. verify returns 0 only for a valid signature. */
int pal_crypto_mldsa65_sign(void *port, const uint8_t *sk, size_t sk_len,
                            const uint8_t *msg, size_t msg_len,
                            const uint8_t *ctx, size_t ctx_len,
                            uint8_t *sig);
int pal_crypto_mldsa65_verify(void *port, const uint8_t *pk,
                              const uint8_t *msg, size_t msg_len,
                              const uint8_t *ctx, size_t ctx_len,
                              const uint8_t *sig, size_t sig_len);

/* SHA3-256, incremental. clone copies a computation in progress (dst is not initialised
 * before); final writes the digest and ends the computation (h must be initialised again
 * before reuse). Every init or clone is matched by exactly one final. */
void pal_crypto_sha3_256_init(void *port, pal_sha3_ctx *h);
void pal_crypto_sha3_256_update(void *port, pal_sha3_ctx *h, const uint8_t *data, size_t n);
void pal_crypto_sha3_256_clone(void *port, pal_sha3_ctx *dst, const pal_sha3_ctx *src);
void pal_crypto_sha3_256_final(void *port, pal_sha3_ctx *h, uint8_t *out);

/* HMAC-SHA3-256 (RFC 2104 over SHA3-256: block size 136 bytes). HKDF is built on it by the
 * core. */
int pal_crypto_hmac_sha3_256(void *port, const uint8_t *key, size_t key_len,
                             const uint8_t *msg, size_t msg_len,
                             uint8_t *out);

/* ChaCha20-Poly1305 (RFC 8439). seal writes pt_len bytes of ciphertext then the 16-byte tag
 * to `out`. open checks the tag over ct (ct_len includes the tag) and writes ct_len - 16
 * bytes of plaintext; `out` may equal `ct` (in-place). On failure the content of `out` is
 * unspecified and the core discards it. */
int pal_crypto_chacha20poly1305_seal(void *port, const uint8_t *key,
                                     const uint8_t *nonce,
                                     const uint8_t *aad, size_t aad_len,
                                     const uint8_t *pt, size_t pt_len, uint8_t *out);
int pal_crypto_chacha20poly1305_open(void *port, const uint8_t *key,
                                     const uint8_t *nonce,
                                     const uint8_t *aad, size_t aad_len,
                                     const uint8_t *ct, size_t ct_len, uint8_t *out);

/* One AES-256 block encryption (header protection: the mask is AES-256-ECB of a sample). */
int pal_crypto_aes256_encrypt_block(void *port, const uint8_t *key, const uint8_t *in,
                                    uint8_t *out);

#ifdef __cplusplus
}
#endif

#endif /* PAL_CRYPTO_H */
