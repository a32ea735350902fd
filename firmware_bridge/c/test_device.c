/*
 * test_device.c - host test harness for pal_device.c (no Python needed).
 *
 *     cc -std=c99 -Wall -Wextra -pedantic -Werror -DPAL_TEST_REPLAY_PQ -I. \
 *        test_device.c test_port_openssl.c pal_device.c -lcrypto -o test_device
 *     ./test_device              # known-answer vectors
 *     ./test_device --fuzz 20000 # plus that many hostile datagrams (build with
 *                                # -fsanitize=address,undefined to catch any bad access)
 *
 * The vectors (../vectors/device_vectors.h, generated from the Python implementation) check:
 *   - the key schedule from fixed inputs;
 *   - packets sealed with header protection on epochs 0 and 1, byte for byte, and the
 *     client's packets opened;
 *   - one whole handshake: fed the client's recorded ClientHello records, the device must
 *     send exactly the recorded ServerHello records at MTU 512, accept the recorded
 *     ClientFinished, acknowledge it and seal its first packet byte for byte.
 *
 * The symmetric primitives come from the linked port (test_port_openssl.c, or a firmware
 * author's own). ML-KEM and ML-DSA draw fresh randomness that no vector can fix, so with
 * -DPAL_TEST_REPLAY_PQ this file replays them: keygen returns the recorded key, encaps the
 * recorded ciphertext and secret for the recorded client key, sign the recorded signature
 * after checking the hash it is asked to sign, verify accepts only the recorded signature over
 * the recorded transcript hash, decaps the recorded secret for the recorded ciphertext. Every
 * other byte the device produces is then determined, and compared. Without the macro the
 * handshake vector is skipped and a real port's ML-KEM/ML-DSA is used by the fuzz.
 *
 * Exits 0 when every check passed. Unlike the core, this file uses stdio and stdlib freely.
 */
#include "pal_device.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../vectors/device_vectors.h"

static int passed;
static int failed;

static void check(int ok, const char *what)
{
    if (ok) {
        passed++;
    } else {
        failed++;
        printf("FAIL %s\n", what);
    }
}

static uint32_t rng_state = 0x12345678u;
static uint32_t rng(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 17;
    rng_state ^= rng_state << 5;
    return rng_state;
}

/* ---- the replayed post-quantum half of the port ----------------------------------------- */

#ifdef PAL_TEST_REPLAY_PQ
static int replay_hash_ok = 1;

int pal_crypto_random(void *port, uint8_t *out, size_t n)
{
    (void)port;
    if (n == 32)
        memcpy(out, V_HANDSHAKE_SERVER_NONCE, 32);
    else if (n == 7) /* the session RID's random part; its check bytes follow (§8.4) */
        memcpy(out, V_HANDSHAKE_RID + 10, 7);
    else
        memset(out, 0x5A, n);
    return 0;
}

int pal_crypto_mlkem768_keygen(void *port, uint8_t *pk, uint8_t *sk)
{
    (void)port;
    memcpy(pk, V_HANDSHAKE_SERVER_KEM_PK, PAL_MLKEM768_PK_BYTES);
    memset(sk, 0, PAL_MLKEM768_SK_BYTES);
    memcpy(sk, V_HANDSHAKE_SERVER_KEM_SEED, 64);
    return 0;
}

/* The client's K_c sits after version and three one-entry id lists, nonce and length. */
#define CH_KC_OFFSET (1u + 4u + 4u + 4u + 32u + 2u)

int pal_crypto_mlkem768_encaps(void *port, const uint8_t *pk, uint8_t *ct, uint8_t *ss)
{
    (void)port;
    if (memcmp(pk, V_HANDSHAKE_CH + CH_KC_OFFSET, PAL_MLKEM768_PK_BYTES) != 0)
        return -1;
    memcpy(ct, V_HANDSHAKE_CT_C, PAL_MLKEM768_CT_BYTES);
    memcpy(ss, V_HANDSHAKE_SS_C, 32);
    return 0;
}

int pal_crypto_mlkem768_decaps(void *port, const uint8_t *sk, const uint8_t *ct, uint8_t *ss)
{
    (void)port;
    if (memcmp(sk, V_HANDSHAKE_SERVER_KEM_SEED, 64) != 0
        || memcmp(ct, V_HANDSHAKE_CT_S, PAL_MLKEM768_CT_BYTES) != 0)
        memset(ss, 0xEE, 32); /* implicit rejection: some other secret */
    else
        memcpy(ss, V_HANDSHAKE_SS_S, 32);
    return 0;
}

int pal_crypto_mldsa65_sign(void *port, const uint8_t *sk, size_t sk_len, const uint8_t *msg,
                            size_t msg_len, const uint8_t *ctx, size_t ctx_len, uint8_t *sig)
{
    (void)port; (void)sk; (void)sk_len;
    /* The device must ask to sign SHA3-256(CH* || SH*) under "PALISADE server". */
    if (msg_len != 32 || memcmp(msg, V_HANDSHAKE_SH_SIGNED_HASH, 32) != 0
        || ctx_len != 15 || memcmp(ctx, "PALISADE server", 15) != 0)
        replay_hash_ok = 0;
    memcpy(sig, V_HANDSHAKE_SERVER_SIGNATURE, PAL_MLDSA65_SIG_BYTES);
    return 0;
}

int pal_crypto_mldsa65_verify(void *port, const uint8_t *pk, const uint8_t *msg, size_t msg_len,
                              const uint8_t *ctx, size_t ctx_len, const uint8_t *sig,
                              size_t sig_len)
{
    (void)port;
    return (memcmp(pk, V_HANDSHAKE_CLIENT_IDENTITY_PK, PAL_MLDSA65_PK_BYTES) == 0
            && msg_len == 32 && memcmp(msg, V_HANDSHAKE_TH, 32) == 0
            && ctx_len == 15 && memcmp(ctx, "PALISADE client", 15) == 0
            && sig_len == V_HANDSHAKE_CLIENT_SIGNATURE_LEN
            && memcmp(sig, V_HANDSHAKE_CLIENT_SIGNATURE, sig_len) == 0) ? 0 : 1;
}
#endif

/* ---- helpers ---------------------------------------------------------------------------- */

static uint8_t dummy_pk[PAL_MLDSA65_PK_BYTES];
static const uint8_t dummy_sk[32] = {1};
static uint8_t pins[1][32];

static void base_config(pal_device_config *cfg)
{
    memset(cfg, 0, sizeof *cfg);
    cfg->identity_pk = dummy_pk;
    cfg->identity_sk = dummy_sk;
    cfg->identity_sk_len = sizeof dummy_sk;
    cfg->mtu = 512;
}

static int next_event_of(pal_device *d, int type, pal_device_event *ev)
{
    while (pal_device_poll_event(d, ev))
        if (ev->type == type)
            return 1;
    return 0;
}

/* Feed a copy (the device decrypts in place). */
static void feed(pal_device *d, const uint8_t *p, size_t n, uint64_t now)
{
    static uint8_t buf[70000];
    memcpy(buf, p, n);
    pal_device_input(d, buf, n, now);
}

/* ---- vectors ---------------------------------------------------------------------------- */

static void test_key_schedule(void)
{
    uint8_t master[32], out[32];
    static const char *const labels[] = {"PALISADE epoch 0", "PALISADE s2c hp", "PALISADE c2s hp"};
    const uint8_t *want[] = {V_KEY_SCHEDULE_EPOCH0, V_KEY_SCHEDULE_S2C_HP, V_KEY_SCHEDULE_C2S_HP};
    unsigned i;
    check(pal_device_master_secret(NULL, V_KEY_SCHEDULE_SS_C, V_KEY_SCHEDULE_SS_S,
                                   V_KEY_SCHEDULE_CLIENT_NONCE, V_KEY_SCHEDULE_SERVER_NONCE,
                                   V_KEY_SCHEDULE_TH, master) == 0
          && memcmp(master, V_KEY_SCHEDULE_MASTER, 32) == 0, "key schedule: master");
    for (i = 0; i < 3; i++) {
        pal_device_hkdf_expand(NULL, master, (const uint8_t *)labels[i], strlen(labels[i]), out,
                               32);
        check(memcmp(out, want[i], 32) == 0, labels[i]);
    }
    pal_device_hkdf_expand(NULL, V_KEY_SCHEDULE_EPOCH0, (const uint8_t *)"PALISADE epoch step",
                           19, out, 32);
    check(memcmp(out, V_KEY_SCHEDULE_EPOCH1, 32) == 0, "key schedule: epoch 1");
    pal_device_hkdf_expand(NULL, V_KEY_SCHEDULE_EPOCH1, (const uint8_t *)"PALISADE s2c iv", 15,
                           out, 12);
    check(memcmp(out, V_KEY_SCHEDULE_EPOCH1_S2C_IV, 12) == 0, "key schedule: epoch 1 s2c iv");
    pal_device_hkdf_expand(NULL, V_KEY_SCHEDULE_EPOCH0, (const uint8_t *)"PALISADE c2s key",
                           16, out, 32);
    check(memcmp(out, V_KEY_SCHEDULE_EPOCH0_C2S_KEY, 32) == 0, "key schedule: epoch 0 c2s key");
}

static void test_records(void)
{
    static pal_device d;
    pal_device_config cfg;
    pal_device_event ev;
    uint8_t out[600];
    size_t n = 0;
    base_config(&cfg);
    check(pal_device_init(&d, &cfg, 0) == 0, "records: init");
    check(pal_device_install_master(&d, V_RECORDS_MASTER, V_RECORDS_RID, 0) == 0,
          "records: install");
    check(pal_device_send(&d, 0, V_RECORDS_PAYLOAD_S2C, V_RECORDS_PAYLOAD_S2C_LEN, 0, out,
                          sizeof out, &n) == 0
          && n == V_RECORDS_S2C_EPOCH0_LEN && memcmp(out, V_RECORDS_S2C_EPOCH0, n) == 0,
          "records: s2c sealed on epoch 0");
    feed(&d, V_RECORDS_C2S_EPOCH0, V_RECORDS_C2S_EPOCH0_LEN, 1);
    check(next_event_of(&d, PAL_EV_DATA, &ev) && ev.len == V_RECORDS_PAYLOAD_C2S_LEN
          && memcmp(ev.data, V_RECORDS_PAYLOAD_C2S, ev.len) == 0, "records: c2s opened, epoch 0");
    check(pal_device_step_epoch_for_test(&d) == 0, "records: step epoch");
    check(pal_device_send(&d, 0, V_RECORDS_PAYLOAD_S2C, V_RECORDS_PAYLOAD_S2C_LEN, 2, out,
                          sizeof out, &n) == 0
          && n == V_RECORDS_S2C_EPOCH1_LEN && memcmp(out, V_RECORDS_S2C_EPOCH1, n) == 0,
          "records: s2c sealed on epoch 1 (key_phase 1)");
    feed(&d, V_RECORDS_C2S_EPOCH1, V_RECORDS_C2S_EPOCH1_LEN, 3);
    check(next_event_of(&d, PAL_EV_DATA, &ev) && ev.len == V_RECORDS_PAYLOAD_C2S_LEN,
          "records: c2s opened, epoch 1");
    feed(&d, V_RECORDS_C2S_EPOCH1, V_RECORDS_C2S_EPOCH1_LEN, 4);
    check(d.drops[PAL_DROP_REPLAY] == 1 && !next_event_of(&d, PAL_EV_DATA, &ev),
          "records: a replay is dropped and counted");
    feed(&d, V_RECORDS_C2S_EPOCH0, V_RECORDS_C2S_EPOCH0_LEN, 5);
    check(d.drops[PAL_DROP_EPOCH] == 1, "records: the retired epoch is refused");
    pal_device_wipe(&d);
}

#ifdef PAL_TEST_REPLAY_PQ
static void test_handshake(void)
{
    static pal_device d;
    pal_device_config cfg;
    pal_device_event ev;
    pal_sha3_ctx h;
    uint8_t out[600];
    size_t off, n, k, i;
    int ok = 1;

    memset(&cfg, 0, sizeof cfg);
    cfg.identity_pk = V_HANDSHAKE_SERVER_IDENTITY_PK;
    cfg.identity_sk = V_HANDSHAKE_SERVER_IDENTITY_SEED;
    cfg.identity_sk_len = 32;
    pal_crypto_sha3_256_init(NULL, &h);
    pal_crypto_sha3_256_update(NULL, &h, V_HANDSHAKE_CLIENT_IDENTITY_PK,
                               V_HANDSHAKE_CLIENT_IDENTITY_PK_LEN);
    pal_crypto_sha3_256_final(NULL, &h, pins[0]);
    cfg.pinned = (const uint8_t (*)[32])pins;
    cfg.pinned_count = 1;
    memcpy(cfg.node_id, V_HANDSHAKE_RID, 8);
    cfg.has_node_id = 1;
    cfg.mtu = V_HANDSHAKE_MTU;
    check(pal_device_init(&d, &cfg, 0) == 0, "handshake: init");

    for (off = 0; off < V_HANDSHAKE_CH_RECORDS_LEN; off += 2u + n) {
        n = ((size_t)V_HANDSHAKE_CH_RECORDS[off] << 8) | V_HANDSHAKE_CH_RECORDS[off + 1];
        feed(&d, V_HANDSHAKE_CH_RECORDS + off + 2, n, 10);
    }
    check(pal_device_state(&d) == PAL_DEV_WAIT_FIN, "handshake: CH accepted");
    check(replay_hash_ok, "handshake: the device signs SHA3-256(CH* || SH*)");
    for (off = 0; off < V_HANDSHAKE_SH_RECORDS_LEN; off += 2u + n) {
        n = ((size_t)V_HANDSHAKE_SH_RECORDS[off] << 8) | V_HANDSHAKE_SH_RECORDS[off + 1];
        k = pal_device_output(&d, 11, out, sizeof out);
        if (k != n || memcmp(out, V_HANDSHAKE_SH_RECORDS + off + 2, n) != 0)
            ok = 0;
    }
    check(ok, "handshake: SH records byte for byte at MTU 512");
    check(pal_device_output(&d, 11, out, sizeof out) == 0, "handshake: nothing more than SH");
    for (off = 0; off < V_HANDSHAKE_CF_RECORDS_LEN; off += 2u + n) {
        n = ((size_t)V_HANDSHAKE_CF_RECORDS[off] << 8) | V_HANDSHAKE_CF_RECORDS[off + 1];
        feed(&d, V_HANDSHAKE_CF_RECORDS + off + 2, n, 20);
    }
    check(pal_device_state(&d) == PAL_DEV_ESTABLISHED, "handshake: CF verified");
    check(next_event_of(&d, PAL_EV_HANDSHAKE_DONE, &ev) && ev.pin_index == 0,
          "handshake: done event");
    k = pal_device_output(&d, 21, out, sizeof out);
    check(k == V_HANDSHAKE_CF_ACK_LEN && memcmp(out, V_HANDSHAKE_CF_ACK, k) == 0,
          "handshake: CF acknowledged");
    check(pal_device_send(&d, 0, V_HANDSHAKE_PAYLOAD_S2C, V_HANDSHAKE_PAYLOAD_S2C_LEN, 22, out,
                          sizeof out, &n) == 0
          && n == V_HANDSHAKE_S2C_EPOCH0_LEN && memcmp(out, V_HANDSHAKE_S2C_EPOCH0, n) == 0,
          "handshake: first packet byte for byte");
    feed(&d, V_HANDSHAKE_C2S_EPOCH0, V_HANDSHAKE_C2S_EPOCH0_LEN, 23);
    check(next_event_of(&d, PAL_EV_DATA, &ev) && ev.len == V_HANDSHAKE_PAYLOAD_C2S_LEN
          && memcmp(ev.data, V_HANDSHAKE_PAYLOAD_C2S, ev.len) == 0,
          "handshake: client's first packet opened");
    for (i = 0; i < sizeof d.ks_sk; i++)
        ok &= d.ks_sk[i] == 0;
    check(ok, "handshake: the ephemeral KEM key is erased");
    pal_device_wipe(&d);
}
#endif

/* ---- fuzz: hostile datagrams at every stage ------------------------------------------- */

static void mutate(uint8_t *p, size_t *n, size_t cap)
{
    uint32_t what = rng() % 6, k;
    switch (what) {
    case 0: /* flip bits */
        for (k = 0; k < 1 + rng() % 4 && *n; k++)
            p[rng() % *n] ^= (uint8_t)(1u << (rng() % 8));
        break;
    case 1: /* truncate */
        *n = *n ? rng() % *n : 0;
        break;
    case 2: /* extend with junk */
        for (k = rng() % 64; k && *n < cap; k--)
            p[(*n)++] = (uint8_t)rng();
        break;
    case 3: /* random header fields */
        if (*n > 40) {
            for (k = 0; k < 4; k++)
                p[30 + rng() % 10] = (uint8_t)rng();
        }
        break;
    case 4: /* length field */
        if (*n > 6) {
            p[4] = (uint8_t)rng();
            p[5] = (uint8_t)rng();
        }
        break;
    default: /* pure noise */
        *n = rng() % cap;
        for (k = 0; k < *n; k++)
            p[k] = (uint8_t)rng();
        if (*n > 2 && (rng() & 1)) {
            p[0] = 0x51;
            p[1] = (rng() & 1) ? 0x48 : 0x50;
        }
    }
}

/* The i-th record of a (u16 length, record) list; returns its length. */
static size_t nth_record(const uint8_t *list, size_t list_len, uint32_t i, const uint8_t **rec)
{
    size_t off = 0, n = 0, count = 0;
    while (off + 2u <= list_len) {
        n = ((size_t)list[off] << 8) | list[off + 1];
        if (count++ == i)
            break;
        off += 2u + n;
    }
    *rec = list + off + 2u;
    return n;
}

static void fuzz(unsigned rounds)
{
    static pal_device d;
    static uint8_t buf[1200];
    pal_device_config cfg;
    pal_device_event ev;
    uint8_t out[600];
    unsigned r, stage = 0;
    size_t n, off;
    uint32_t total = 0, states[PAL_DEV_N_STATES] = {0};
    int i;
    base_config(&cfg);
#ifdef PAL_TEST_REPLAY_PQ
    cfg.identity_pk = V_HANDSHAKE_SERVER_IDENTITY_PK;
    cfg.pinned = (const uint8_t (*)[32])pins; /* filled by test_handshake */
    cfg.pinned_count = 1;
    memcpy(cfg.node_id, V_HANDSHAKE_RID, 8);
    cfg.has_node_id = 1;
#endif
    for (r = 0; r < rounds; r++) {
        const uint8_t *src;
        size_t len;
        uint64_t now = 1000u + r;
        if (r % 300 == 0) {
            /* Each stage: a fresh session listening, waiting for CF, or established. */
            for (i = 0; i < PAL_DROP_N; i++)
                total += d.drops[i];
            pal_device_wipe(&d);
            pal_device_init(&d, &cfg, now);
            stage = (r / 300) % 3;
            if (stage == 1) {
                for (off = 0; off < V_HANDSHAKE_CH_RECORDS_LEN; off += 2u + n) {
                    n = ((size_t)V_HANDSHAKE_CH_RECORDS[off] << 8) | V_HANDSHAKE_CH_RECORDS[off + 1];
                    feed(&d, V_HANDSHAKE_CH_RECORDS + off + 2, n, now);
                }
            } else if (stage == 2) {
                pal_device_install_master(&d, V_RECORDS_MASTER, V_RECORDS_RID, now);
            }
        }
        switch (stage * 4u + rng() % 4u) {
        case 0: case 1: case 2:
            len = nth_record(V_HANDSHAKE_CH_RECORDS, V_HANDSHAKE_CH_RECORDS_LEN, rng() % 7, &src);
            break;
        case 4: case 5: case 6:
            len = nth_record(V_HANDSHAKE_CF_RECORDS, V_HANDSHAKE_CF_RECORDS_LEN, rng() % 9, &src);
            break;
        case 8: case 9:
            src = V_RECORDS_C2S_EPOCH0; len = V_RECORDS_C2S_EPOCH0_LEN; break;
        case 10:
            src = V_RECORDS_C2S_EPOCH1; len = V_RECORDS_C2S_EPOCH1_LEN; break;
        default:
            src = V_HANDSHAKE_CF_ACK; len = V_HANDSHAKE_CF_ACK_LEN; break;
        }
        if (len > sizeof buf)
            len = sizeof buf;
        memcpy(buf, src, len);
        n = len;
        if (rng() % 8)
            mutate(buf, &n, sizeof buf);
        pal_device_input(&d, buf, n, now);
        while (pal_device_output(&d, now, out, sizeof out) > 0)
            ;
        while (pal_device_poll_event(&d, &ev))
            ;
        {
            uint64_t t;
            if (pal_device_next_deadline(&d, &t) && t <= now + 1000u)
                pal_device_handle_timer(&d, t);
        }
        if (pal_device_state(&d) >= 0 && pal_device_state(&d) < PAL_DEV_N_STATES)
            states[pal_device_state(&d)]++;
        else
            check(0, "fuzz: the state stays valid");
    }
    for (i = 0; i < PAL_DROP_N; i++)
        total += d.drops[i];
    printf("fuzz: %u hostile datagrams, %lu dropped and counted; rounds ended in "
           "LISTEN %u, WAIT_CH %u, WAIT_FIN %u, ESTABLISHED %u, CLOSING %u, CLOSED %u\n",
           rounds, (unsigned long)total, states[0], states[1], states[2], states[3], states[4],
           states[5]);
    check(total > 0, "fuzz: drops are counted");
    pal_device_wipe(&d);
}

int main(int argc, char **argv)
{
    unsigned rounds = 0;
    if (argc == 3 && strcmp(argv[1], "--fuzz") == 0)
        rounds = (unsigned)strtoul(argv[2], NULL, 10);
    test_key_schedule();
    test_records();
#ifdef PAL_TEST_REPLAY_PQ
    test_handshake();
#else
    printf("handshake vector skipped (build with -DPAL_TEST_REPLAY_PQ)\n");
#endif
    if (rounds)
        fuzz(rounds);
    printf("pal_device: %d checks passed, %d failed; sizeof(pal_device) = %lu\n", passed,
           failed, (unsigned long)sizeof(pal_device));
    return failed ? 1 : 0;
}
