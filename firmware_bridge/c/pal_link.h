/*
 * pal_link.h - PALISADE serial link codec (framing, CRC-32, link control messages).
 *
 * One portable C99 source shared by device firmware and the host (it is compiled into the
 * Python extension palisade_c.link). The wire format is specified in firmware_bridge/LINK.md;
 * this header only describes the API.
 *
 *   frame on the wire = COBS(channel u8 | payload | CRC-32 LE of channel|payload) | 0x00
 *
 * Constraints the code keeps, so that it drops into any bare-metal project:
 *   - no dynamic memory: every buffer is provided by the caller and never grown;
 *   - no libc beyond <stdint.h>, <stddef.h> and <string.h> (memcpy, memchr, memset);
 *   - no global mutable state: several links can run side by side, one context each;
 *   - nothing here is reentrant per context: feed one decoder from one place (an ISR or a
 *     task, not both) and guard an encoder the same way.
 *
 * Build options: how CRC-32 is computed (results are identical; pal_link.c has the trade-offs).
 * Define at most one; without any, 64-bit hosts get SLICE8 and everything else BYTE_TABLE.
 *   PAL_LINK_CRC_TABLE_FREE  bit by bit, no table: smallest flash, slowest.
 *   PAL_LINK_CRC_BYTE_TABLE  one 1 KiB const table, one lookup per byte.
 *   PAL_LINK_CRC_SLICE8      8 KiB of const tables (pal_link_crc_tables.h), fastest on big cores.
 */
#ifndef PAL_LINK_H
#define PAL_LINK_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- constants --------------------------------------------------------------------------- */

#define PAL_LINK_VERSION 2u        /* link version carried in HELLO (2: HELLO may carry a node id) */
#define PAL_LINK_DEFAULT_MTU 512u  /* payload bytes per frame unless HELLO says less */
#define PAL_LINK_MIN_MTU 64u       /* smallest MTU a HELLO may announce */
#define PAL_LINK_MAX_PAYLOAD 65535u /* MTU is a u16, so no frame can carry more */

#define PAL_LINK_CH_DATA 0u     /* PALISADE datagrams */
#define PAL_LINK_CH_LOG 1u      /* device log text */
#define PAL_LINK_CH_CONTROL 2u  /* link control: HELLO, PING, PONG */

/* Channel byte plus CRC: what a frame adds around its payload before COBS. */
#define PAL_LINK_FRAME_OVERHEAD 5u

/* Decoder buffer needed to accept payloads of up to `mtu` bytes. */
#define PAL_LINK_DEC_BUF_SIZE(mtu) ((size_t)(mtu) + PAL_LINK_FRAME_OVERHEAD)

/*
 * Worst-case bytes on the wire for a payload of n bytes, delimiter included: COBS adds one
 * code byte per started run of 254 bytes of its input (channel + payload + CRC).
 */
#define PAL_LINK_ENCODED_MAX(n) \
    ((size_t)(n) + PAL_LINK_FRAME_OVERHEAD + ((size_t)(n) + PAL_LINK_FRAME_OVERHEAD + 253u) / 254u + 1u)

/* Link control messages (channel 2): the first payload byte is the type. */
#define PAL_LINK_CTL_HELLO 0x01u
#define PAL_LINK_CTL_PING 0x02u
#define PAL_LINK_CTL_PONG 0x03u

#define PAL_LINK_HELLO_LEN 8u  /* type, version u8, mtu u16 LE, boot counter u32 LE */
/* Version 2 HELLO of a device that has a node id: the 8 bytes above, then the node id. */
#define PAL_LINK_HELLO_NODE_LEN 16u
#define PAL_LINK_NODE_ID_LEN 8u
#define PAL_LINK_PING_LEN 5u   /* type, token u32 LE (PONG has the same shape) */

/* Error codes (negative return values). */
#define PAL_LINK_ERR_SPACE (-1)      /* output buffer too small */
#define PAL_LINK_ERR_TOO_LONG (-2)   /* payload longer than PAL_LINK_MAX_PAYLOAD */
#define PAL_LINK_ERR_MALFORMED (-3)  /* control message too short or of another type */
#define PAL_LINK_ERR_VERSION (-4)    /* HELLO announces link version 0 */
#define PAL_LINK_ERR_MTU (-5)        /* HELLO announces an MTU below PAL_LINK_MIN_MTU */

/* ---- CRC-32 ------------------------------------------------------------------------------ */

/*
 * CRC-32 as zlib computes it (reflected polynomial 0xEDB88320, init and final xor 0xFFFFFFFF).
 * Incremental like zlib's crc32(): start with crc = 0 and pass each result back in.
 * pal_link_crc32(0, "123456789", 9) == 0xCBF43926.
 */
uint32_t pal_link_crc32(uint32_t crc, const uint8_t *data, size_t len);

/* ---- encoder ----------------------------------------------------------------------------- */

/*
 * Streaming encoder: begin, write the payload in as many pieces as convenient (a header and a
 * body need not be joined first), end. Output goes straight into the caller's buffer; nothing
 * is buffered inside. The fields are private.
 */
typedef struct pal_link_enc {
    uint8_t *out;
    size_t cap;
    size_t pos;         /* next free byte of out */
    size_t code_pos;    /* where the open COBS block's code byte goes */
    size_t payload_len;
    uint32_t crc;       /* zlib-style running CRC of channel|payload */
    uint8_t code;       /* 1 + literal bytes in the open block; 0 = no block open */
    int8_t err;         /* first error seen, sticky until the next begin */
} pal_link_enc_t;

void pal_link_enc_begin(pal_link_enc_t *e, uint8_t *out, size_t cap, uint8_t channel);
void pal_link_enc_write(pal_link_enc_t *e, const uint8_t *data, size_t len);
/* Appends CRC and delimiter. Returns the frame length in out, or a PAL_LINK_ERR_* code. */
int32_t pal_link_enc_end(pal_link_enc_t *e);

/*
 * One-shot: the whole frame for `payload` into out. Returns its length or a PAL_LINK_ERR_*
 * code. A buffer of PAL_LINK_ENCODED_MAX(len) bytes always suffices.
 */
int32_t pal_link_encode(uint8_t channel, const uint8_t *payload, size_t len, uint8_t *out,
                        size_t cap);

/* Same bound as PAL_LINK_ENCODED_MAX, as a function (for bindings). */
size_t pal_link_encoded_max(size_t payload_len);

/* ---- decoder ----------------------------------------------------------------------------- */

typedef struct pal_link_stats {
    uint32_t frames;       /* good frames delivered */
    uint32_t crc_errors;   /* decoded cleanly but the CRC did not match */
    uint32_t oversize;     /* longer than the buffer; skipped up to the next delimiter */
    uint32_t cobs_errors;  /* a delimiter arrived inside a COBS block (bytes were lost) */
    uint32_t short_frames; /* non-empty, but shorter than channel + CRC */
} pal_link_stats_t;

/* A delivered frame. payload points into the decoder's buffer: valid until the next push or
 * feed on the same decoder, so copy it out (or finish with it) before feeding more bytes. */
typedef struct pal_link_frame {
    const uint8_t *payload;
    size_t len;
    uint8_t channel;
} pal_link_frame_t;

/* Decoder context. The fields are private except stats, which callers may read and zero. */
typedef struct pal_link_dec {
    uint8_t *buf;
    size_t cap;
    size_t len;       /* decoded bytes of the frame in progress */
    uint32_t crc;     /* CRC register over those bytes */
    uint8_t state;
    uint8_t code;     /* code byte of the current COBS block */
    uint8_t left;     /* literal bytes still due in the current block */
    pal_link_stats_t stats;
} pal_link_dec_t;

/*
 * buf/cap: the frame buffer, PAL_LINK_DEC_BUF_SIZE(max_payload) bytes. Frames that decode to
 * more than cap bytes are dropped (counted in stats.oversize). cap must be at least
 * PAL_LINK_FRAME_OVERHEAD or every frame is dropped.
 */
void pal_link_dec_init(pal_link_dec_t *d, uint8_t *buf, size_t cap);

/* Forget any partial frame (for example after reopening a port); keeps stats. */
void pal_link_dec_reset(pal_link_dec_t *d);

/* Feed one byte (from a UART RX interrupt, say). Returns 1 and fills *frame when this byte
 * completed a good frame, else 0. */
int pal_link_dec_push(pal_link_dec_t *d, uint8_t byte, pal_link_frame_t *frame);

/*
 * Feed a block of bytes. Stops right after the byte that completes a good frame (returns 1 and
 * fills *frame) or when the input runs out (returns 0). *consumed says how many bytes were
 * eaten either way; call again with the rest:
 *
 *     while (len > 0) {
 *         size_t used;
 *         if (pal_link_dec_feed(&dec, p, len, &used, &frame)) handle(&frame);
 *         p += used; len -= used;
 *     }
 *
 * Equivalent to pushing the bytes one by one, only faster: runs of literal bytes are copied
 * with memcpy and the CRC is checked once per frame.
 */
int pal_link_dec_feed(pal_link_dec_t *d, const uint8_t *data, size_t len, size_t *consumed,
                      pal_link_frame_t *frame);

/* ---- link control (channel 2) ------------------------------------------------------------ */

typedef struct pal_link_hello {
    uint8_t version;
    uint16_t mtu;
    uint32_t boot_counter;
    /* Version 2: the device's node id (its RID steering prefix), valid when has_node_id is
     * 1. Filled by pal_link_hello_parse; pal_link_hello_build ignores it (see
     * pal_link_hello_build_node). Zero-initialise the struct and old code stays correct. */
    uint8_t has_node_id;
    uint8_t node_id[PAL_LINK_NODE_ID_LEN];
} pal_link_hello_t;

/* Control payloads: write PAL_LINK_HELLO_LEN / PAL_LINK_PING_LEN bytes to out and return that
 * length. Send them with pal_link_encode(PAL_LINK_CH_CONTROL, ...). */
size_t pal_link_hello_build(uint8_t out[PAL_LINK_HELLO_LEN], const pal_link_hello_t *hello);
/* A version 2 HELLO announcing `node_id` (8 bytes): PAL_LINK_HELLO_NODE_LEN bytes, with the
 * version byte raised to at least 2. A gateway routes to the device by this id. */
size_t pal_link_hello_build_node(uint8_t out[PAL_LINK_HELLO_NODE_LEN],
                                 const pal_link_hello_t *hello,
                                 const uint8_t node_id[PAL_LINK_NODE_ID_LEN]);
size_t pal_link_ping_build(uint8_t out[PAL_LINK_PING_LEN], uint32_t token);
size_t pal_link_pong_build(uint8_t out[PAL_LINK_PING_LEN], uint32_t token);

/* Type byte of a control payload, or PAL_LINK_ERR_MALFORMED when it is empty. */
int pal_link_ctl_type(const uint8_t *payload, size_t len);

/* Parse a HELLO payload. Bytes after the known fields are ignored (room for later versions).
 * A version >= 2 HELLO of at least PAL_LINK_HELLO_NODE_LEN bytes carries a node id
 * (has_node_id = 1); otherwise has_node_id = 0 and node_id is zeroed.
 * Returns 0 or a PAL_LINK_ERR_* code. */
int pal_link_hello_parse(const uint8_t *payload, size_t len, pal_link_hello_t *hello);

/* Token of a PING or PONG payload (ctl_type says which). Returns 0 or PAL_LINK_ERR_MALFORMED. */
int pal_link_token_parse(const uint8_t *payload, size_t len, uint32_t *token);

/* MTU both sides can use: the smaller of the two announcements. */
uint16_t pal_link_negotiate_mtu(uint16_t ours, uint16_t theirs);

#ifdef __cplusplus
}
#endif

#endif /* PAL_LINK_H */
