/*
 * test_port_openssl.c - the symmetric half of pal_crypto.h on OpenSSL 3 (libcrypto), for the
 * host C harness (test_device.c). It is an example binding as much as a test tool: each
 * function is one library call, which is what a firmware port to wolfCrypt or Monocypher
 * looks like too (firmware_bridge/DEVICE.md).
 *
 * ML-KEM and ML-DSA are not in OpenSSL 3.0; test_device.c replays them from the vectors
 * (-DPAL_TEST_REPLAY_PQ) or the firmware author links a real port.
 *
 * `port` is unused here. A failed allocation or library error returns non-zero.
 */
#include "pal_crypto.h"

#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>
#include <string.h>

int pal_crypto_random(void *port, uint8_t *out, size_t n);

#ifndef PAL_TEST_REPLAY_PQ
int pal_crypto_random(void *port, uint8_t *out, size_t n)
{
    (void)port;
    return RAND_bytes(out, (int)n) == 1 ? 0 : -1;
}
#endif

static EVP_MD_CTX *md_of(const pal_sha3_ctx *h)
{
    EVP_MD_CTX *md;
    memcpy(&md, h->u.bytes, sizeof md);
    return md;
}

static void md_set(pal_sha3_ctx *h, EVP_MD_CTX *md) { memcpy(h->u.bytes, &md, sizeof md); }

void pal_crypto_sha3_256_init(void *port, pal_sha3_ctx *h)
{
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    (void)port;
    if (md != NULL)
        EVP_DigestInit_ex(md, EVP_sha3_256(), NULL);
    md_set(h, md);
}

void pal_crypto_sha3_256_update(void *port, pal_sha3_ctx *h, const uint8_t *data, size_t n)
{
    (void)port;
    if (md_of(h) != NULL && n)
        EVP_DigestUpdate(md_of(h), data, n);
}

void pal_crypto_sha3_256_clone(void *port, pal_sha3_ctx *dst, const pal_sha3_ctx *src)
{
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    (void)port;
    if (md != NULL && md_of(src) != NULL)
        EVP_MD_CTX_copy_ex(md, md_of(src));
    md_set(dst, md);
}

void pal_crypto_sha3_256_final(void *port, pal_sha3_ctx *h, uint8_t *out)
{
    unsigned int n = 32;
    EVP_MD_CTX *md = md_of(h);
    (void)port;
    memset(out, 0, 32);
    if (md != NULL) {
        EVP_DigestFinal_ex(md, out, &n);
        EVP_MD_CTX_free(md);
    }
    md_set(h, NULL);
}

int pal_crypto_hmac_sha3_256(void *port, const uint8_t *key, size_t key_len, const uint8_t *msg,
                             size_t msg_len, uint8_t *out)
{
    unsigned int n = 32;
    (void)port;
    return HMAC(EVP_sha3_256(), key, (int)key_len, msg, msg_len, out, &n) != NULL && n == 32
               ? 0 : -1;
}

static int aead(int enc, const uint8_t *key, const uint8_t *nonce, const uint8_t *aad,
                size_t aad_len, const uint8_t *in, size_t in_len, uint8_t *out, uint8_t *tag)
{
    EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();
    int len = 0, ok;
    if (c == NULL)
        return -1;
    ok = EVP_CipherInit_ex(c, EVP_chacha20_poly1305(), NULL, key, nonce, enc) == 1;
    if (ok && !enc)
        ok = EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_AEAD_SET_TAG, 16, tag) == 1;
    if (ok && aad_len)
        ok = EVP_CipherUpdate(c, NULL, &len, aad, (int)aad_len) == 1;
    if (ok && in_len)
        ok = EVP_CipherUpdate(c, out, &len, in, (int)in_len) == 1;
    if (ok)
        ok = EVP_CipherFinal_ex(c, out + in_len, &len) == 1;
    if (ok && enc)
        ok = EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_AEAD_GET_TAG, 16, tag) == 1;
    EVP_CIPHER_CTX_free(c);
    return ok ? 0 : -1;
}

int pal_crypto_chacha20poly1305_seal(void *port, const uint8_t *key, const uint8_t *nonce,
                                     const uint8_t *aad, size_t aad_len, const uint8_t *pt,
                                     size_t pt_len, uint8_t *out)
{
    (void)port;
    return aead(1, key, nonce, aad, aad_len, pt, pt_len, out, out + pt_len);
}

int pal_crypto_chacha20poly1305_open(void *port, const uint8_t *key, const uint8_t *nonce,
                                     const uint8_t *aad, size_t aad_len, const uint8_t *ct,
                                     size_t ct_len, uint8_t *out)
{
    uint8_t tag[16];
    (void)port;
    if (ct_len < 16)
        return -1;
    memcpy(tag, ct + ct_len - 16, 16);
    return aead(0, key, nonce, aad, aad_len, ct, ct_len - 16, out, tag);
}

int pal_crypto_aes256_encrypt_block(void *port, const uint8_t *key, const uint8_t *in,
                                    uint8_t *out)
{
    EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();
    int len = 0, ok;
    (void)port;
    if (c == NULL)
        return -1;
    ok = EVP_EncryptInit_ex(c, EVP_aes_256_ecb(), NULL, key, NULL) == 1
         && EVP_CIPHER_CTX_set_padding(c, 0) == 1
         && EVP_EncryptUpdate(c, out, &len, in, 16) == 1 && len == 16;
    EVP_CIPHER_CTX_free(c);
    return ok ? 0 : -1;
}
